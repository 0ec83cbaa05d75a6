from decimal import Decimal

import pytest

from dexorder.core import quantity


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Gi", 2**30),
        ("512Mi", 512 * 2**20),
        ("500m", Decimal("0.5")),
        ("2", 2),
        ("1e3", 1000),
        ("1.5G", 1_500_000_000),
    ],
)
def test_parse(text: str, value: Decimal | int) -> None:
    assert quantity.parse(text) == Decimal(value)


def test_ordering_across_suffixes() -> None:
    assert quantity.parse("10Gi") > quantity.parse("1Gi") > quantity.parse("1000Mi")


@pytest.mark.parametrize("text", ["", "Gi", "1 Gi", "1Zi", "abc"])
def test_invalid(text: str) -> None:
    with pytest.raises(quantity.InvalidQuantity):
        quantity.parse(text)
