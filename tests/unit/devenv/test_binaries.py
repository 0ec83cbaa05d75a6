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
