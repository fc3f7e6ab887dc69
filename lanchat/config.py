"""lanchatd's configuration: TOML file + environment + flags into one validated ``Config``.

Precedence (DESIGN.md): command-line flag > environment (``LANCHAT_*``) > config
file > built-in default.  Every option is a flat top-level key of the TOML file
(``lanchatd.toml(5)``), an environment variable ``LANCHAT_<KEY>`` (the key in
upper case, see :data:`ENV_VARS`), and for the common ones a flag of ``lanchatd``
(declared here, in :func:`add_daemon_arguments`, so flags and options cannot
drift apart).

Pure: nothing here reads the clock, the network or ``os.environ``; the
environment, the host name and the user name are passed in.  The one exception
is :func:`load_file`, which reads the file's bytes, and :func:`load`, the
convenience that the daemon calls, which decides whether the default file
exists.

Every mistake becomes one :class:`~lanchat.errors.ConfigError` whose message is
a single line naming where the value came from (the file, the environment
variable or the flag), the key, and what is wrong -- never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lanchat import __version__
from lanchat.errors import ConfigError, ValidationError
from lanchat.limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_MAX_RATE,
    MAX_NICK_CHARS,
)
from lanchat.model import validate_nick

DEFAULT_PORT = 7654
CONFIG_NAME = "lanchatd.toml"
SOCKET_NAME = "control.sock"
SYSTEM_CONFIG = "/etc/lanchat/lanchatd.toml"
SYSTEM_STATE_DIR = "/var/lib/lanchat"
SYSTEM_SOCKET = "/run/lanchat/control.sock"
#: Default ``socket_mode`` of a user daemon: its owner only (it speaks as that user).
USER_SOCKET_MODE = 0o600
#: Default ``socket_mode`` of the system service: the group ``lanchat`` may chat through it.
SYSTEM_SOCKET_MODE = 0o660

LOG_LEVELS = ("debug", "info", "warning", "error")
IP_VERSIONS = ("v4", "v6", "all")
#: ``trust``: what a peer's changed key gets (lanchat.pins.TrustPolicy's values).
TRUST_POLICIES = ("first-use", "always")

#: Longest mDNS instance label (RFC 6763 §4.1.1: a DNS label, 63 octets).
MAX_NAME_BYTES = 63
#: Most entries of ``interfaces`` / ``peers``; a config is not a host list.
MAX_LIST_ITEMS = 256

#: Keys SIGHUP applies without a restart; every other key needs one.
RELOADABLE = frozenset(
    {"nick", "log_level", "peers", "max_rate", "max_age_days", "max_messages"}
)


@dataclass(frozen=True, slots=True)
class Config:
    """Every option of lanchatd with its value after precedence; immutable.

    Lists are tuples so that a ``Config`` is hashable and safely shared between
    threads.  ``None`` for ``max_age_days`` / ``max_messages`` means "keep
    forever".  ``config_file`` is where the file layer came from (``None`` when
    no file was read) -- informational, not an option.
    """

    nick: str
    name: str
    state_dir: str
    socket: str
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    udp: bool = True
    interfaces: tuple[str, ...] = ()
    ip_version: str = "v4"
    discovery: bool = True
    peers: tuple[str, ...] = ()
    socket_mode: int = USER_SOCKET_MODE  # build_config: SYSTEM_SOCKET_MODE with system
    socket_group: str | None = None
    max_age_days: float | None = None
    max_messages: int | None = None
    log_level: str = "warning"
    max_rate: float = DEFAULT_MAX_RATE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP
    secret: str | None = None
    secret_file: str | None = None
    #: None (not set): plain clients allowed, but with a secret only those that can
    #: prove it; True: all plain clients; False: TLS clients only (see lanchatd.toml(5)).
    plain_clients: bool | None = None
    trust: str = "first-use"
    system: bool = False
    config_file: str | None = None


#: Keys a config file may set (``system`` is chosen before the file is found,
#: so it is a flag only).
FILE_KEYS = tuple(
    f.name for f in dataclasses.fields(Config) if f.name not in ("system", "config_file")
)

#: Environment variable for each key: ``LANCHAT_`` + the key in upper case.
#: ``LANCHAT_CONFIG`` (the file to read) is handled by :func:`config_path`.
ENV_VARS: dict[str, str] = {key: "LANCHAT_" + key.upper() for key in (*FILE_KEYS, "system")}

#: The flag that sets each key, for error messages.
FLAG_NAMES: dict[str, str] = {
    "port": "--port", "bind": "--bind", "nick": "--nick", "discovery": "--no-discovery",
    "peers": "--peer", "max_rate": "--max-rate", "interfaces": "--interface",
    "udp": "--no-udp", "state_dir": "--state-dir", "socket": "--socket",
    "system": "--system", "log_level": "-v",
}


# --------------------------------------------------------------------------- validators
# Each takes the raw value (from TOML, already typed; or a string from the
# environment when ``from_env``) and returns the clean value or raises
# ``_Bad(problem)``; the caller adds where and which key.


class _Bad(Exception):
    """A value is wrong; the message says what, without saying where."""


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _bool(value: object, from_env: bool) -> bool:
    if from_env and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise _Bad(f"must be true or false (1/0, yes/no, on/off), not {value!r}")
    if isinstance(value, bool):
        return value
    raise _Bad(f"must be true or false, not {_describe(value)}")


def _int(value: object, from_env: bool, lo: int, hi: int | None) -> int:
    if from_env and isinstance(value, str):
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise _Bad(f"must be an integer, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"must be an integer, not {_describe(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
        raise _Bad(f"must be {bound}, not {value}")
    return value


def _number(value: object, from_env: bool, lo: float) -> float:
    if from_env and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Bad(f"must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f"must be a number, not {_describe(value)}")
    number = float(value)
    if not number >= lo or number == float("inf"):  # also rejects NaN
        raise _Bad(f"must be a finite number of at least {lo:g}, not {value}")
    return number


def _str(value: object, from_env: bool) -> str:
    if not isinstance(value, str):
        raise _Bad(f"must be a string, not {_describe(value)}")
    if not value or not value.isprintable():
        raise _Bad("must be a non-empty string of printable characters")
    return value


def _str_list(value: object, from_env: bool) -> tuple[str, ...]:
    if from_env and isinstance(value, str):
        # Environment lists are comma- or space-separated: "eth0,wlan0".
        value = [item for item in re.split(r"[,\s]+", value) if item]
    if not isinstance(value, list | tuple):
        raise _Bad(f"must be a list of strings, not {_describe(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise _Bad(f"has {len(value)} entries; at most {MAX_LIST_ITEMS} are allowed")
    out = []
    for item in value:
        if not isinstance(item, str) or not item or not item.isprintable():
            raise _Bad(f"must be a list of non-empty strings, but contains {_describe(item)}")
        out.append(item)
    return tuple(out)


def parse_peer(text: str) -> tuple[str, int]:
    """Split ``"HOST:PORT"`` or ``"[V6ADDR]:PORT"`` into ``(host, port)``.

    Raises :class:`ValueError` with the reason when ``text`` is not such a pair.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [ADDRESS]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 peer as [ADDRESS]:PORT")
        if any(c.isspace() for c in host) or len(host) > 253:
            raise ValueError(f"{host!r} in {text!r} is not a host name")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be 1-65535")
    return host, int(port)


def _peers(value: object, from_env: bool) -> tuple[str, ...]:
    peers = _str_list(value, from_env)
    for peer in peers:
        try:
            parse_peer(peer)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
    return peers


def _nick(value: object, from_env: bool) -> str:
    try:
        return validate_nick(value)
    except ValidationError as exc:
        raise _Bad(f"{exc} (got {_describe(value)})") from None


def _name(value: object, from_env: bool) -> str:
    name = _str(value, from_env)
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise _Bad(f"must be at most {MAX_NAME_BYTES} bytes of UTF-8 (an mDNS label)")
    if "." in name:
        raise _Bad("must not contain '.' (it is one DNS-SD instance label)")
    return name


def _bind(value: object, from_env: bool) -> str:
    text = _str(value, from_env)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise _Bad(
            f"must be an IP address such as 0.0.0.0, :: or 127.0.0.1, not {text!r}"
        ) from None


def _choice(choices: tuple[str, ...]) -> Callable[[object, bool], str]:
    def check(value: object, from_env: bool) -> str:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        raise _Bad(f"must be one of {', '.join(choices)}, not {_describe(value)}")
    return check


def _path(value: object, from_env: bool, *, home: str | None = None,
          relative_ok: bool = False) -> str:
    path = _str(value, from_env)
    if path == "~" or path.startswith("~/"):
        if not home:
            raise _Bad(f"{path!r} starts with ~ but $HOME is not set")
        path = home + path[1:]
    if not path.startswith("/") and not relative_ok:
        raise _Bad(f"must be an absolute path (or start with ~/), not {path!r}")
    return path


def _optional_path(value: object, from_env: bool, **kw: Any) -> str | None:
    if value == "":
        return None
    return _path(value, from_env, **kw)


def _mode(value: object, from_env: bool) -> int:
    # TOML writes octal as 0o660; a string "0660" / "660" (environment) is octal too.
    if isinstance(value, str):
        text = value.strip().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise _Bad(f"must be an octal file mode such as 0o660, not {value!r}")
        value = int(text, 8)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"must be an octal file mode such as 0o660, not {_describe(value)}")
    if not 0 <= value <= 0o777:
        raise _Bad(f"must be a file mode from 0o000 to 0o777 (write it as 0o660), not {value}")
    return value


def _forever_int(value: object, from_env: bool) -> int | None:
    n = _int(value, from_env, 0, None)
    return n or None  # 0 = keep forever (TOML has no null)


def _forever_days(value: object, from_env: bool) -> float | None:
    n = _number(value, from_env, 0.0)
    return n or None


def _optional_str(value: object, from_env: bool) -> str | None:
    if value == "":
        return None
    return _str(value, from_env)


# key -> validator(value, from_env) -> clean value.  Paths are handled apart (they need $HOME).
_VALIDATORS: dict[str, Callable[[object, bool], Any]] = {
    "nick": _nick,
    "name": _name,
    "port": lambda v, e: _int(v, e, 0, 65535),
    "bind": _bind,
    "udp": _bool,
    "interfaces": _str_list,
    "ip_version": _choice(IP_VERSIONS),
    "discovery": _bool,
    "peers": _peers,
    "socket_mode": _mode,
    "socket_group": _optional_str,
    "max_age_days": _forever_days,
    "max_messages": _forever_int,
    "log_level": _choice(LOG_LEVELS),
    "max_rate": lambda v, e: _number(v, e, 0.0),
    "max_connections": lambda v, e: _int(v, e, 1, 1_000_000),
    "max_connections_per_ip": lambda v, e: _int(v, e, 0, 1_000_000),
    "secret": _optional_str,
    "plain_clients": _bool,
    "trust": _choice(TRUST_POLICIES),
    "system": _bool,
}
_PATH_KEYS = ("state_dir", "socket", "secret_file")


# --------------------------------------------------------------------------- defaults


def _first(value: str | None) -> str | None:
    """First entry of a colon-separated systemd directory list, if absolute."""
    if not value:
        return None
    first = value.split(":", 1)[0]
    return first if first.startswith("/") else None


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> str:
    """An XDG base directory; relative values are invalid and ignored (basedir spec)."""
    value = env.get(var, "")
    if value.startswith("/"):
        return value
    home = env.get("HOME", "")
    if not home.startswith("/"):
        raise ConfigError(f"cannot locate ${var}: neither it nor $HOME is an absolute path")
    return f"{home}/{fallback}"


def default_config_path(env: Mapping[str, str], system: bool) -> str:
    """The config file read when neither ``--config`` nor ``$LANCHAT_CONFIG`` names one.

    ``$CONFIGURATION_DIRECTORY`` (systemd's ``ConfigurationDirectory=``) first,
    then ``/etc/lanchat/lanchatd.toml`` for the system service or
    ``$XDG_CONFIG_HOME/lanchat/lanchatd.toml`` for a user daemon.
    """
    confdir = _first(env.get("CONFIGURATION_DIRECTORY"))
    if confdir:
        return f"{confdir}/{CONFIG_NAME}"
    if system:
        return SYSTEM_CONFIG
    return f"{_xdg(env, 'XDG_CONFIG_HOME', '.config')}/lanchat/{CONFIG_NAME}"


def config_path(flag: str | None, env: Mapping[str, str], system: bool) -> tuple[str, bool]:
    """``(path, explicit)``: the file to read and whether it was asked for by name.

    A missing file that was named (``--config`` or ``$LANCHAT_CONFIG``) is an
    error; a missing default file means "all defaults".
    """
    if flag:
        return flag, True
    if env.get("LANCHAT_CONFIG"):
        return env["LANCHAT_CONFIG"], True
    return default_config_path(env, system), False


def default_state_dir(env: Mapping[str, str], system: bool) -> str:
    """``$STATE_DIRECTORY`` (first entry), else /var/lib/lanchat or $XDG_STATE_HOME/lanchat."""
    state = _first(env.get("STATE_DIRECTORY"))
    if state:
        return state
    if system:
        return SYSTEM_STATE_DIR
    return f"{_xdg(env, 'XDG_STATE_HOME', '.local/state')}/lanchat"


def default_socket(env: Mapping[str, str], system: bool) -> str:
    """``$RUNTIME_DIRECTORY/control.sock``, else /run/lanchat/… or $XDG_RUNTIME_DIR/lanchat/…."""
    runtime = _first(env.get("RUNTIME_DIRECTORY"))
    if runtime:
        return f"{runtime}/{SOCKET_NAME}"
    if system:
        return SYSTEM_SOCKET
    xdg_runtime = env.get("XDG_RUNTIME_DIR", "")
    if not xdg_runtime.startswith("/"):
        # Never guess a shared /tmp path (symlink and squatting attacks); say what to do.
        raise ConfigError(
            "$XDG_RUNTIME_DIR is not set, so there is no safe place for the control socket: "
            "set socket in the config, --socket, or $LANCHAT_SOCKET"
        )
    return f"{xdg_runtime}/lanchat/{SOCKET_NAME}"


def sanitize_nick(raw: str) -> str:
    """Turn a login name into a valid nick (spaces and ``:``/``,`` become ``_``).

    Falls back to ``"user"`` when nothing usable is left.
    """
    nick = "".join("_" if (c.isspace() or c in ":," or not c.isprintable()) else c for c in raw)
    nick = nick.lstrip("/*!#[")[:MAX_NICK_CHARS]
    try:
        return validate_nick(nick)
    except ValidationError:
        return "user"


def login_name() -> str | None:
    """The user name of our uid from the password database (None if it has no entry)."""
    import os
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return None


def default_nick(env: Mapping[str, str], username: str | None = None, *,
                 login: Callable[[], str | None] | None = login_name,
                 hostname: str | None = None) -> str:
    """The login user name, sanitised: ``username``, else ``$USER`` / ``$LOGNAME``, else
    our uid's name (a root shell may set neither variable), else the host's first label,
    else ``user``.  ``login`` looks the uid's name up (None: do not)."""
    raw = (username or env.get("USER") or env.get("LOGNAME")
           or (login() if login is not None else None)
           or (hostname or "").split(".", 1)[0] or "user")
    return sanitize_nick(raw)


def default_name(nick: str, hostname: str) -> str:
    """``"<nick> on <host>"`` (first label of the host name), cut to one mDNS label."""
    host = hostname.split(".", 1)[0] or "localhost"
    name = f"{nick} on {host}".replace(".", "-")
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name


# --------------------------------------------------------------------------- building


def _suggest(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _layer_values(
    layer: Mapping[str, Any], *, where: Callable[[str], str], from_env: bool,
    home: str | None, relative_paths: bool,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in layer.items():
        try:
            if key in _PATH_KEYS:
                validate_path = _optional_path if key == "secret_file" else _path
                out[key] = validate_path(raw, from_env, home=home, relative_ok=relative_paths)
            else:
                out[key] = _VALIDATORS[key](raw, from_env)
        except _Bad as exc:
            raise ConfigError(f"{where(key)}: {exc}") from None
    return out


def build_config(
    *,
    file_data: Mapping[str, Any] | None,
    file_path: str | None,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
    hostname: str = "localhost",
    username: str | None = None,
) -> Config:
    """Merge the layers (flag > environment > file > default) into a validated ``Config``.

    ``file_data`` is the parsed TOML (see :func:`parse_toml`), ``file_path``
    where it came from (for messages); ``env`` the process environment;
    ``flags`` the options given on the command line, keyed by option name (as
    :func:`flags_from_args` returns them).  ``hostname`` / ``username`` feed the
    defaults of ``name`` and ``nick``; the daemon passes the real ones.

    Raises :class:`ConfigError` with one line naming the source, the key and
    the problem: an unknown key (with a suggestion), a wrong type, a value out
    of range.
    """
    home = env.get("HOME") or None
    file_label = file_path or "config file"
    read_file = file_path if file_data is not None else None
    file_data = file_data or {}
    for key in file_data:
        if key not in FILE_KEYS:
            hint = _suggest(key, FILE_KEYS)
            if key == "system":
                hint = " (choose the system service with lanchatd --system)"
            elif isinstance(file_data[key], dict):
                hint += " (options are flat top-level keys, not [tables])"
            raise ConfigError(f"{file_label}: unknown key '{key}'{hint}")
    for key in flags:
        if key not in ENV_VARS:
            raise ConfigError(f"unknown option {key!r} (a bug in the flag parser)")

    from_file = _layer_values(
        file_data, where=lambda k: f"{file_label}: key '{k}'", from_env=False,
        home=home, relative_paths=False,
    )
    env_layer = {key: env[var] for key, var in ENV_VARS.items() if var in env}
    from_env = _layer_values(
        env_layer, where=lambda k: f"environment variable {ENV_VARS[k]}", from_env=True,
        home=home, relative_paths=False,
    )
    from_flags = _layer_values(
        flags, where=lambda k: f"option {FLAG_NAMES.get(k, '--' + k.replace('_', '-'))}",
        from_env=False, home=home, relative_paths=True,
    )
    merged = {**from_file, **from_env, **from_flags}

    system = bool(merged.pop("system", False))
    if "nick" not in merged:
        merged["nick"] = default_nick(env, username, hostname=hostname)
    if "name" not in merged:
        merged["name"] = default_name(merged["nick"], hostname)
    if "state_dir" not in merged:
        merged["state_dir"] = default_state_dir(env, system)
    if "socket" not in merged:
        merged["socket"] = default_socket(env, system)
    if "socket_mode" not in merged:
        merged["socket_mode"] = SYSTEM_SOCKET_MODE if system else USER_SOCKET_MODE
    if merged.get("secret") and merged.get("secret_file"):
        raise ConfigError(
            f"{file_label}: set either 'secret' or 'secret_file', not both"
        )
    return Config(system=system, config_file=read_file, **merged)


# --------------------------------------------------------------------------- files


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024 * 1024 + 1)  # one byte more than parse_toml accepts


def load_file(path: str) -> bytes:
    """Read a config file's bytes; raise :class:`ConfigError` naming the file on failure."""
    try:
        return _read(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None


def parse_toml(data: bytes, path: str | None) -> dict[str, Any]:
    """Parse a config file's bytes as TOML; syntax errors become one-line ``ConfigError``."""
    label = path or "config file"
    if len(data) > 1024 * 1024:
        raise ConfigError(f"{label}: larger than 1 MiB; this is not a lanchatd config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 (byte {exc.start})") from None
    # Imported here: only a daemon with a config file needs it, and it is ~5 ms of a
    # new daemon's start-up (python -X importtime, issue 13's catch-up benchmark).
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # On 3.11 the position is only in the message ("... (at line 3, column 7)").
        raise ConfigError(f"{label}: invalid TOML: {exc}") from None


def load(
    *, flags: Mapping[str, Any], config_flag: str | None, env: Mapping[str, str],
    hostname: str = "localhost", username: str | None = None,
) -> Config:
    """The daemon's one call: find, read and parse the file, then :func:`build_config`.

    A missing *default* file means defaults; a missing file named by
    ``--config`` or ``$LANCHAT_CONFIG`` is an error.
    """
    system = bool(flags.get("system", False))
    if "system" not in flags and ENV_VARS["system"] in env:
        try:
            system = _bool(env[ENV_VARS["system"]], True)
        except _Bad as exc:
            raise ConfigError(f"environment variable {ENV_VARS['system']}: {exc}") from None
    path, explicit = config_path(config_flag, env, system)
    if not explicit:
        try:
            _read(path)
        except FileNotFoundError:
            return build_config(file_data=None, file_path=None, env=env, flags=flags,
                                hostname=hostname, username=username)
        except OSError:
            pass  # load_file below reports it, naming the file
    data = load_file(path)
    return build_config(file_data=parse_toml(data, path), file_path=path, env=env,
                        flags=flags, hostname=hostname, username=username)


# --------------------------------------------------------------------------- reload


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What changed between two configs: ``apply`` now, ``restart`` needs a restart.

    Each maps a key to ``(old, new)``.
    """

    apply: dict[str, tuple[Any, Any]]
    restart: dict[str, tuple[Any, Any]]

    def __bool__(self) -> bool:
        return bool(self.apply or self.restart)


def diff(old: Config, new: Config) -> ConfigDiff:
    """Split the differences between ``old`` and ``new`` into reloadable and restart-only."""
    apply: dict[str, tuple[Any, Any]] = {}
    restart: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(Config):
        if f.name == "config_file":
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before != after:
            (apply if f.name in RELOADABLE else restart)[f.name] = (before, after)
    return ConfigDiff(apply=apply, restart=restart)


def render(config: Config) -> str:
    """The effective configuration as TOML (for ``lanchatd --check-config``)."""
    lines = []
    if config.config_file:
        lines.append(f"# from {config.config_file}, environment and flags")
    for key in FILE_KEYS:
        value = getattr(config, key)
        if value is None:
            lines.append(f"# {key} = (unset)")
            continue
        if key == "socket_mode":
            text = f"0o{value:o}"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, tuple):
            text = "[" + ", ".join(_toml_str(v) for v in value) + "]"
        elif isinstance(value, str):
            text = _toml_str("(set)" if key == "secret" else value)
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def _toml_str(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in out)
    return f'"{out}"'


# --------------------------------------------------------------------------- flags


def verbosity_level(count: int) -> str:
    """``-v`` → info, ``-vv`` (or more) → debug."""
    return "debug" if count >= 2 else "info"


def daemon_parser() -> argparse.ArgumentParser:
    """``lanchatd``'s argument parser (also what its man page and bash completion describe)."""
    parser = argparse.ArgumentParser(
        prog="lanchatd",
        description="LAN chat daemon: a chat hub that finds its peers with mDNS "
                    "and keeps history in SQLite.  See lanchatd(8).",
    )
    add_daemon_arguments(parser)
    return parser


def add_daemon_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare lanchatd's flags.  Defaults are ``None`` so that only given flags count."""
    add = parser.add_argument
    add("--port", type=int, metavar="N",
        help=f"TCP/UDP port (default {DEFAULT_PORT}; 0 = any free port)")
    add("--bind", metavar="ADDR", help="address to listen on (default 0.0.0.0)")
    add("--nick", metavar="NAME", help="this node's nickname (default: your login name)")
    add("--no-discovery", dest="discovery", action="store_const", const=False,
        help="do not advertise or browse with mDNS")
    add("--peer", dest="peers", action="append", metavar="HOST:PORT",
        help="link to this daemon (repeatable)")
    add("--max-rate", type=float, metavar="N",
        help="messages per second per connection (default 20; 0 = unlimited)")
    add("--interface", dest="interfaces", action="append", metavar="IF",
        help="interface name or address for mDNS (repeatable; default: automatic)")
    add("--no-udp", dest="udp", action="store_const", const=False,
        help="do not serve chat over UDP")
    add("--state-dir", metavar="DIR", help="history and node id directory")
    add("--socket", metavar="PATH", help="control socket path")
    add("--config", metavar="PATH", help="config file (default: see lanchatd.toml(5))")
    add("--system", action="store_const", const=True,
        help="use the system service's paths (/etc, /var/lib, /run)")
    add("-v", "--verbose", action="count", help="log more: -v info, -vv debug")
    add("--check-config", action="store_true",
        help="validate the configuration, print it and exit (0 = valid, 78 = invalid)")
    add("--version", action="version", version=f"lanchatd {__version__}")


def flags_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, keyed by option name.

    Omits flags not given, ``--config``, ``--check-config`` and ``--version``;
    ``-v`` becomes ``log_level``.
    """
    out: dict[str, Any] = {}
    for key in ("port", "bind", "nick", "discovery", "peers", "max_rate", "interfaces",
                "udp", "state_dir", "socket", "system"):
        value = getattr(ns, key, None)
        if value is not None:
            out[key] = value
    verbose = getattr(ns, "verbose", None)
    if verbose:
        out["log_level"] = verbosity_level(verbose)
    return out
