"""Configuration: precedence, defaults, and one clear line for every mistake."""

from __future__ import annotations

import argparse
import os
import pwd
import tempfile
from pathlib import Path
from typing import Any

import pytest

from lanchat import config as cfg
from lanchat.config import Config, build_config, diff, parse_toml
from lanchat.errors import ConfigError

ENV = {"HOME": "/home/alice", "USER": "alice", "XDG_RUNTIME_DIR": "/run/user/1000"}


def build(file_data: dict[str, Any] | None = None, env: dict[str, str] | None = None,
          flags: dict[str, Any] | None = None, path: str | None = "/etc/x.toml") -> Config:
    return build_config(file_data=file_data, file_path=path, env=ENV if env is None else env,
                        flags=flags or {}, hostname="box.example.org")


def error(**kw: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        build(**kw)
    message = str(exc.value)
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def test_defaults_for_a_user_daemon() -> None:
    c = build()
    assert c.nick == "alice"
    assert c.name == "alice on box"
    assert c.port == 7654 and c.bind == "0.0.0.0" and c.udp and c.discovery
    assert c.interfaces == () and c.peers == () and c.ip_version == "v4"
    assert c.state_dir == "/home/alice/.local/state/lanchat"
    assert c.socket == "/run/user/1000/lanchat/control.sock"
    assert c.socket_mode == 0o600  # the user's own: nobody else speaks as them
    assert c.max_age_days is None and c.max_messages is None
    assert c.log_level == "warning" and c.max_rate == 20.0
    assert not c.system and c.config_file is None  # no file was read
    assert build(file_data={}).config_file == "/etc/x.toml"


def test_defaults_for_the_system_service() -> None:
    c = build(flags={"system": True}, env={"USER": "lanchat"})
    assert c.system
    assert c.state_dir == "/var/lib/lanchat"
    assert c.socket == "/run/lanchat/control.sock"
    assert c.socket_mode == 0o660  # the group lanchat may chat through it
    assert build(flags={"system": True}, env={"USER": "lanchat", "LANCHAT_SOCKET_MODE": "0640"}
                 ).socket_mode == 0o640
    assert cfg.default_config_path({}, True) == "/etc/lanchat/lanchatd.toml"


def test_systemd_directories_win_over_builtin_paths() -> None:
    env = {**ENV, "STATE_DIRECTORY": "/var/lib/lanchat:/var/lib/other",
           "RUNTIME_DIRECTORY": "/run/lanchat", "CONFIGURATION_DIRECTORY": "/etc/lanchat"}
    c = build(env=env)
    assert c.state_dir == "/var/lib/lanchat"
    assert c.socket == "/run/lanchat/control.sock"
    assert cfg.default_config_path(env, False) == "/etc/lanchat/lanchatd.toml"


def test_xdg_variables_and_relative_values() -> None:
    env = {**ENV, "XDG_STATE_HOME": "/s", "XDG_CONFIG_HOME": "relative/ignored"}
    assert build(env=env).state_dir == "/s/lanchat"
    assert cfg.default_config_path(env, False) == "/home/alice/.config/lanchat/lanchatd.toml"


def test_no_runtime_dir_is_a_clear_error_not_a_tmp_guess() -> None:
    msg = error(env={"HOME": "/h", "USER": "a"})
    assert "XDG_RUNTIME_DIR" in msg
    assert build(env={"HOME": "/h"}, flags={"socket": "x.sock"}).socket == "x.sock"


def test_precedence_flag_over_env_over_file_over_default() -> None:
    file_data = {"port": 1000, "nick": "filenick", "max_rate": 5}
    env = {**ENV, "LANCHAT_PORT": "2000", "LANCHAT_NICK": "envnick"}
    c = build(file_data=file_data, env=env, flags={"port": 3000})
    assert c.port == 3000       # flag
    assert c.nick == "envnick"  # env over file
    assert c.max_rate == 5.0    # file over default
    assert c.name == "envnick on box"


def test_every_file_key_has_an_env_var() -> None:
    assert set(cfg.FILE_KEYS) <= set(cfg.ENV_VARS)
    assert cfg.ENV_VARS["max_connections_per_ip"] == "LANCHAT_MAX_CONNECTIONS_PER_IP"


def test_env_values_are_parsed_from_strings() -> None:
    env = {**ENV, "LANCHAT_UDP": "no", "LANCHAT_DISCOVERY": "0",
           "LANCHAT_PEERS": "10.0.0.2:7654, [fe80::1]:7000", "LANCHAT_INTERFACES": "eth0 wlan0",
           "LANCHAT_SOCKET_MODE": "0600", "LANCHAT_MAX_MESSAGES": "0",
           "LANCHAT_MAX_AGE_DAYS": "1.5", "LANCHAT_LOG_LEVEL": "DEBUG"}
    c = build(env=env)
    assert not c.udp and not c.discovery
    assert c.peers == ("10.0.0.2:7654", "[fe80::1]:7000")
    assert c.interfaces == ("eth0", "wlan0")
    assert c.socket_mode == 0o600
    assert c.max_messages is None and c.max_age_days == 1.5
    assert c.log_level == "debug"


def test_a_full_toml_file_parses() -> None:
    text = b"""
nick = "bob"
name = "Bob's laptop"
port = 0
bind = "::"
udp = false
interfaces = ["eth0"]
ip_version = "all"
discovery = false
peers = ["192.168.1.7:7654", "chat-host:7654"]
state_dir = "~/chat"
socket = "/run/user/1000/chat.sock"
socket_mode = 0o600
socket_group = "users"
max_age_days = 30
max_messages = 100000
log_level = "info"
max_rate = 0
max_connections = 10
max_connections_per_ip = 0
secret_file = "/etc/lanchat/secret"
"""
    c = build(file_data=parse_toml(text, "/etc/x.toml"))
    assert c.nick == "bob" and c.name == "Bob's laptop" and c.port == 0 and c.bind == "::"
    assert c.state_dir == "/home/alice/chat"
    assert c.socket_mode == 0o600 and c.socket_group == "users"
    assert c.max_age_days == 30.0 and c.max_messages == 100000 and c.max_rate == 0.0
    assert c.secret_file == "/etc/lanchat/secret"


@pytest.mark.parametrize(("file_data", "expected"), [
    ({"prot": 7654}, "/etc/x.toml: unknown key 'prot' (did you mean 'port'?)"),
    ({"network": {"port": 1}}, "not [tables]"),
    ({"system": True}, "lanchatd --system"),
    ({"port": "7654"}, "/etc/x.toml: key 'port': must be an integer, not '7654' (str)"),
    ({"port": 70000}, "/etc/x.toml: key 'port': must be from 0 to 65535, not 70000"),
    ({"port": True}, "key 'port': must be an integer"),
    ({"udp": 1}, "key 'udp': must be true or false, not 1 (int)"),
    ({"nick": "a b"}, "key 'nick': nick must be printable characters without spaces"),
    ({"nick": ""}, "key 'nick': nick must be 1-32"),
    ({"name": "x.y"}, "key 'name': must not contain '.'"),
    ({"name": "n" * 64}, "key 'name': must be at most 63 bytes"),
    ({"bind": "localhost"}, "key 'bind': must be an IP address"),
    ({"ip_version": "v5"}, "key 'ip_version': must be one of v4, v6, all"),
    ({"peers": ["nohost"]}, "key 'peers': 'nohost' is not HOST:PORT"),
    ({"peers": ["h:0"]}, "port must be 1-65535"),
    ({"peers": ["::1:7654"]}, "[ADDRESS]:PORT"),
    ({"peers": "h:1"}, "key 'peers': must be a list of strings"),
    ({"interfaces": [1]}, "key 'interfaces': must be a list of non-empty strings"),
    ({"state_dir": "relative"}, "key 'state_dir': must be an absolute path"),
    ({"socket_mode": 660}, "write it as 0o660"),
    ({"max_rate": -1}, "key 'max_rate': must be a finite number of at least 0"),
    ({"max_rate": float("nan")}, "key 'max_rate'"),
    ({"max_connections": 0}, "key 'max_connections': must be from 1"),
    ({"max_messages": -5}, "key 'max_messages': must be 0 or more"),
    ({"log_level": "loud"}, "must be one of debug, info, warning, error"),
    ({"secret": "a", "secret_file": "/b"}, "either 'secret' or 'secret_file'"),
])
def test_bad_file_values_give_one_line_naming_file_and_key(
    file_data: dict[str, Any], expected: str
) -> None:
    msg = error(file_data=file_data)
    assert expected in msg
    assert msg.startswith("/etc/x.toml: ")


def test_bad_env_and_flag_values_name_their_source() -> None:
    assert error(env={**ENV, "LANCHAT_PORT": "x"}) == (
        "environment variable LANCHAT_PORT: must be an integer, not 'x'"
    )
    assert error(env={**ENV, "LANCHAT_UDP": "maybe"}).startswith(
        "environment variable LANCHAT_UDP: must be true or false"
    )
    assert error(flags={"port": -1}) == "option --port: must be from 0 to 65535, not -1"
    assert error(flags={"peers": ["x"]}).startswith("option --peer: ")


def test_default_nick_is_the_sanitised_login_name() -> None:
    assert cfg.default_nick({"USER": "Mary Ann"}) == "Mary_Ann"
    assert cfg.default_nick({"LOGNAME": "#root:x"}) == "root_x"
    # No $USER or $LOGNAME (root under sudo -i, a service): the login name of our uid.
    assert cfg.default_nick({}) == cfg.sanitize_nick(pwd.getpwuid(os.getuid()).pw_name)
    assert cfg.default_nick({}, login=None, hostname="box.example.org") == "box"
    assert cfg.default_nick({}, login=None, hostname="") == "user"
    assert cfg.default_nick({"USER": "x" * 50}) == "x" * 32
    assert cfg.default_nick({"USER": "///"}) == "user"
    assert cfg.default_name("alice", "") == "alice on localhost"
    assert len(cfg.default_name("a" * 32, "h" * 60).encode()) <= 63


def test_toml_syntax_error_is_one_line_naming_the_file() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_toml(b"port = = 1\n", "/etc/lanchat/lanchatd.toml")
    msg = str(exc.value)
    assert msg.startswith("/etc/lanchat/lanchatd.toml: invalid TOML: ")
    assert "line 1" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_toml(b"nick = '\xff'\n", "/f")


def test_load_reads_files_and_reports_missing_ones() -> None:
    tmp = tempfile.mkdtemp(dir="/tmp")
    try:
        env = {**ENV, "XDG_CONFIG_HOME": tmp}
        # default file absent: defaults
        c = cfg.load(flags={}, config_flag=None, env=env)
        assert c.port == 7654 and c.config_file is None
        # default file present
        os.mkdir(f"{tmp}/lanchat")
        Path(f"{tmp}/lanchat/lanchatd.toml").write_text("port = 1234\n")
        c = cfg.load(flags={"nick": "zed"}, config_flag=None, env=env)
        assert (c.port, c.nick) == (1234, "zed")
        assert c.config_file == f"{tmp}/lanchat/lanchatd.toml"
        # named file absent: error naming it
        with pytest.raises(ConfigError, match=f"^{tmp}/nope.toml: no such config file$"):
            cfg.load(flags={}, config_flag=f"{tmp}/nope.toml", env=env)
        with pytest.raises(ConfigError, match="no such config file"):
            cfg.load(flags={}, config_flag=None, env={**env, "LANCHAT_CONFIG": f"{tmp}/n"})
        with pytest.raises(ConfigError, match="is a directory"):
            cfg.load(flags={}, config_flag=tmp, env=env)
    finally:
        for p in (f"{tmp}/lanchat/lanchatd.toml",):
            if os.path.exists(p):
                os.unlink(p)
        if os.path.isdir(f"{tmp}/lanchat"):
            os.rmdir(f"{tmp}/lanchat")
        os.rmdir(tmp)


def test_diff_splits_reloadable_from_restart_only() -> None:
    old = build()
    new = build(flags={"nick": "bob", "port": 1, "peers": ["h:1"]},
                file_data={"log_level": "debug"})
    d = diff(old, new)
    assert set(d.apply) == {"nick", "log_level", "peers"}
    assert d.apply["nick"] == ("alice", "bob")
    assert set(d.restart) == {"port", "name"}
    assert not diff(old, build())
    assert {"nick", "log_level", "peers", "max_rate", "max_messages"} <= cfg.RELOADABLE


def test_render_is_valid_toml_that_rebuilds_the_same_config() -> None:
    c = build(flags={"peers": ["h:1"], "nick": 'q"x'}, file_data={"max_messages": 5})
    again = build(file_data=parse_toml(cfg.render(c).encode(), "/r"), path="/r")
    assert dataclass_fields(again) == dataclass_fields(c)


def dataclass_fields(c: Config) -> dict[str, Any]:
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(c).items() if k != "config_file"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lanchatd")
    cfg.add_daemon_arguments(p)
    return p


def test_flags_only_the_given_ones() -> None:
    assert cfg.flags_from_args(parser().parse_args([])) == {}
    ns = parser().parse_args([
        "--port", "0", "--bind", "127.0.0.1", "--nick", "n", "--no-discovery",
        "--peer", "a:1", "--peer", "b:2", "--max-rate", "0", "--interface", "eth0",
        "--no-udp", "--state-dir", "/s", "--socket", "/s/c.sock", "--system", "-vv",
        "--config", "/c.toml", "--check-config",
    ])
    assert cfg.flags_from_args(ns) == {
        "port": 0, "bind": "127.0.0.1", "nick": "n", "discovery": False,
        "peers": ["a:1", "b:2"], "max_rate": 0.0, "interfaces": ["eth0"], "udp": False,
        "state_dir": "/s", "socket": "/s/c.sock", "system": True, "log_level": "debug",
    }
    assert ns.config == "/c.toml" and ns.check_config
    assert cfg.flags_from_args(parser().parse_args(["-v"])) == {"log_level": "info"}
    c = build(flags=cfg.flags_from_args(ns))
    assert c.peers == ("a:1", "b:2") and c.system and not c.discovery


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("lanchatd ")


def test_parse_peer() -> None:
    assert cfg.parse_peer("10.0.0.1:7654") == ("10.0.0.1", 7654)
    assert cfg.parse_peer("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError):
        cfg.parse_peer("[nothex]:80")


def test_plain_clients_is_unset_true_or_false() -> None:
    """Three answers (lanchatd.toml(5)): unset serves plain clients (with a secret only
    those that can prove it), true all of them, false only TLS clients."""
    assert build().plain_clients is None
    assert build(file_data={"plain_clients": False}).plain_clients is False
    assert build(env={**ENV, "LANCHAT_PLAIN_CLIENTS": "true"}).plain_clients is True
    strict = build(file_data={"plain_clients": False})
    rendered = cfg.render(strict)
    assert "plain_clients = false" in rendered
    assert build(file_data=parse_toml(rendered.encode(), "/r"), path="/r").plain_clients is False
    assert "# plain_clients = (unset)" in cfg.render(build())
