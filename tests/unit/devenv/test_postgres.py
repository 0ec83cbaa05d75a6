"""The PostgreSQL command lines and connection string."""

from __future__ import annotations

from pathlib import Path

from dexorder.devenv.postgres import Account, dsn, server_argv


def test_the_dsn_names_the_superuser_and_the_dexorder_database() -> None:
    assert dsn(5433) == "postgresql://postgres@127.0.0.1:5433/dexorder"
    assert dsn(5433, "postgres") == "postgresql://postgres@127.0.0.1:5433/postgres"


def test_the_server_listens_on_loopback_with_its_socket_in_the_data_dir() -> None:
    argv = server_argv(
        Path("/usr/lib/postgresql/15/bin"), Path("/d/cluster"), Path("/d/sockets"), 5433
    )
    assert argv[:5] == ["/usr/lib/postgresql/15/bin/postgres", "-D", "/d/cluster", "-p", "5433"]
    assert argv[argv.index("-h") + 1] == "127.0.0.1"
    assert argv[argv.index("-k") + 1] == "/d/sockets"
    assert "fsync=off" in argv


def test_the_current_user_runs_the_command_unchanged() -> None:
    assert Account().command(["initdb", "-D", "x"]) == ["initdb", "-D", "x"]


def test_root_drops_to_the_service_account() -> None:
    command = Account(uid=101, gid=104).command(["initdb", "-D", "x"])
    assert command[0] == "setpriv"
    assert "--reuid=101" in command
    assert "--regid=104" in command
    assert command[-4:] == ["--", "initdb", "-D", "x"]
