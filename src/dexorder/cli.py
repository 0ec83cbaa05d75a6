"""``dexorder``: the developer commands (the local stack, the benchmarks, the chat client)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# Every command but ``chat`` runs the development harness, which only a source checkout has.
HARNESS_COMMANDS = frozenset({"devenv", "build", "images", "demo"})
HARNESS_MISSING = (
    "needs the development harness (dexorder.devenv), which the dexorder wheel does not"
    " ship: run it from a source checkout, where `uv sync --extra test` installs the"
    " project editable"
)


def has_harness() -> bool:
    return importlib.util.find_spec("dexorder.devenv") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dexorder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    devenv = commands.add_parser("devenv", help="local real services: up, down, status")
    if has_harness():
        from dexorder.devenv import stack

        stack.add_arguments(devenv)
    else:
        # Accepted whatever follows, so the answer is the missing harness, not a usage error.
        devenv.add_argument("arguments", nargs=argparse.REMAINDER)
    build = commands.add_parser(
        "build", help="build and cache the Go binaries (control plane, node, helm)"
    )
    build.add_argument(
        "targets", nargs="*", help="etcd, kwok, kubernetes (the default three), helm, node parts"
    )
    image_commands = commands.add_parser(
        "images", help="build the operator, gateway and agent images (buildah, no registry)"
    ).add_subparsers(dest="images_command", required=True)
    images_build = image_commands.add_parser(
        "build", help="build the three images on a cached Debian base, as OCI archives"
    )
    images_build.add_argument("--tag", default="dev", help="the images' tag (default: dev)")
    images_build.add_argument(
        "--load-into",
        metavar="ADDRESS",
        help="a containerd socket to import the images into (namespace k8s.io)",
    )
    demo = commands.add_parser("demo", help="a working chat on embedded defaults (Ctrl-C stops it)")
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (0: any free one)")
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the demo keeps agents, logs, the URL and the token"
        " (default: ~/.local/share/dexorder/demo)",
    )
    where = demo.add_mutually_exclusive_group()
    where.add_argument(
        "--kubernetes",
        action="store_true",
        help="agents from the operator on a local control plane (kwok) instead of local processes",
    )
    where.add_argument(
        "--node",
        action="store_true",
        help="the images built and the chart helm-installed on a real local node (as root)",
    )
    chat = commands.add_parser("chat", help="a terminal chat client of the WebSocket protocol")
    chat.add_argument("--url", help="gateway URL (default: the running demo's)")
    chat.add_argument(
        "--token",
        help="a JWT (default: the running demo's token, else the gateway's demo token endpoint)",
    )
    chat.add_argument(
        "--demo-dir", type=Path, default=None, help="the running demo's state directory"
    )
    args = parser.parse_args(argv)
    if args.command in HARNESS_COMMANDS and not has_harness():
        print(f"dexorder {args.command}: {HARNESS_MISSING}", file=sys.stderr)
        return 1
    if args.command == "demo":
        from dexorder.devenv import demo as demo_module

        if args.node:
            return demo_module.run_on_node(state_dir=args.state_dir)
        return demo_module.run(port=args.port, state_dir=args.state_dir, kubernetes=args.kubernetes)
    if args.command == "chat":
        from dexorder import chat_client

        return chat_client.main(args.url, args.token, args.demo_dir or chat_client.DEMO_DIR)
    if args.command == "devenv":
        from dexorder.devenv import stack

        return stack.dispatch(args)
    if args.command == "build":
        from dexorder.devenv import binaries

        binaries.build(args.targets or list(binaries.DEFAULT_TARGETS))
        return 0
    if args.command == "images":
        return _images(args.tag, args.load_into)
    parser.print_help()
    return 2


def _images(tag: str, load_into: str | None) -> int:
    from dexorder.devenv import images
    from dexorder.devenv.errors import DevenvError

    try:
        # Refuse a bad tag or socket before minutes of building.
        images.check_tag(tag)
        if load_into is not None and not Path(load_into).is_socket():
            raise images.ImageBuildError(f"--load-into: no containerd socket at {load_into}")
        archives = images.build_images(tag=tag)
        for name, archive in archives.items():
            print(f"{images.image_reference(name, tag)}: {archive}", flush=True)
        if load_into is not None:
            images.load_images(archives.values(), load_into)
            print(f"loaded into {load_into} (namespace {images.CONTAINERD_NAMESPACE})")
    except DevenvError as error:
        print(f"dexorder images: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
