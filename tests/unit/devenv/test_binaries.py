from dexorder.devenv import binaries

UPSTREAM = """module k8s.io/kubernetes

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/apiserver => ./staging/src/k8s.io/apiserver
\tgithub.com/other/thing => github.com/other/thing v1.2.3
)
"""


def test_staging_modules_are_read_from_the_upstream_go_mod() -> None:
    assert binaries.staging_modules(UPSTREAM) == ["k8s.io/api", "k8s.io/apiserver"]


def test_wrapper_replaces_staging_modules_with_their_v0_release() -> None:
    text = binaries.kubernetes_wrapper_go_mod("v1.34.4", UPSTREAM)
    assert "require k8s.io/kubernetes v1.34.4" in text
    assert "\tk8s.io/api => k8s.io/api v0.34.4" in text
    assert "\tk8s.io/apiserver => k8s.io/apiserver v0.34.4" in text
    assert "github.com/other/thing" not in text


def test_ldflags_stamp_the_version() -> None:
    flags = binaries.kubernetes_ldflags("v1.34.4")
    assert "-X k8s.io/component-base/version.gitVersion=v1.34.4" in flags
    assert "-X k8s.io/component-base/version.gitMinor=34" in flags


def test_go_versions_are_read_as_major_and_minor() -> None:
    assert binaries.parse_go_version("go1.26.8\n") == (1, 26)
    assert binaries.parse_go_version("go1.24rc1") == (1, 24)
    assert binaries.parse_go_version("devel go1.27-abcdef") is None
    assert binaries.parse_go_version("") is None


def test_a_new_enough_go_builds_with_its_own_toolchain_wherever_it_stands() -> None:
    chosen = binaries.choose_go([("/usr/lib/go-1.23/bin/go", "go1.23.5"), ("/opt/go", "go1.26.8")])
    assert chosen == binaries.GoToolchain("/opt/go", "local")


def test_debian_12_backports_go_fetches_the_pinned_toolchain() -> None:
    chosen = binaries.choose_go(
        [("/usr/bin/go", "go1.19.8"), ("/usr/lib/go-1.23/bin/go", "go1.23.5")]
    )
    assert chosen == binaries.GoToolchain("/usr/lib/go-1.23/bin/go", binaries.FETCHED_GO_TOOLCHAIN)


def test_a_go_too_old_to_fetch_a_toolchain_is_no_go() -> None:
    assert binaries.choose_go([("/usr/bin/go", "go1.19.8"), ("/broken/go", "")]) is None


def test_the_fetched_toolchain_is_new_enough_for_the_builds() -> None:
    fetched = binaries.parse_go_version(binaries.FETCHED_GO_TOOLCHAIN)
    assert fetched is not None
    assert fetched >= binaries.MINIMUM_GO
