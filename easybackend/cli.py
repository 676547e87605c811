"""The ``easybackend`` command (also ``python run.py``).

``easybackend [serve] [flags]`` starts the server; flags override the
environment and ``.env``. ``easybackend chat`` is the terminal client
(:mod:`easybackend.client`); ``import-json``, ``export`` and
``migrate-storage`` are storage commands (:mod:`easybackend.data_commands`);
``keys`` manages the stored backend keys (:mod:`easybackend.keys_commands`),
``usage`` shows their usage (:mod:`easybackend.usage_commands`).
Bad configuration or a taken port prints one line ``easybackend: error: …``
and exits 2 (configuration) or 1 (start-up), with no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence

# Everything else is imported inside the commands, once SIGINT and SIGTERM are held (see main).

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

# flag -> (environment variable it overrides, help)
SERVE_FLAGS = {
    "--host": ("HOST", "address to listen on (HOST, default 0.0.0.0)"),
    "--http-port": ("HTTP_PORT", "HTTP port, 0 or off to disable (HTTP_PORT, default 8000)"),
    "--model": ("GPT_ENGINE", "model name (GPT_ENGINE)"),
    "--config": (
        "CONFIG_FILE",
        "TOML file of [[upstream]] tables: several providers and keys (CONFIG_FILE)",
    ),
    "--models": (
        "MODELS",
        "models an ask may name, as name or alias=model, comma-separated (MODELS, default: "
        "GPT_ENGINE alone)",
    ),
    "--base-url": ("OPENAI_BASE_URL", "OpenAI-compatible endpoint (OPENAI_BASE_URL)"),
    "--conversations-dir": (
        "CONVERSATIONS_DIR",
        "data directory (CONVERSATIONS_DIR, default ./conversations)",
    ),
    "--database-url": ("DATABASE_URL", "sqlite:///PATH or postgresql://… (DATABASE_URL)"),
    "--max-context-tokens": (
        "MAX_CONTEXT_TOKENS",
        "token budget sent upstream (MAX_CONTEXT_TOKENS, default 4096)",
    ),
    "--memory": (
        "MEMORY",
        "what a conversation does with turns that no longer fit: truncate (drop them) or "
        "summarize (fold them into a running summary) (MEMORY, default truncate)",
    ),
    "--conversation-ttl": (
        "CONVERSATION_TTL",
        "seconds a conversation may stay idle before it is forgotten; 0 or off: never "
        "(CONVERSATION_TTL, default off)",
    ),
    "--summary-model": (
        "SUMMARY_MODEL",
        "model that writes summaries and titles (SUMMARY_MODEL, default the conversation's)",
    ),
    "--auto-title": (
        "AUTO_TITLE",
        "true: the model names each conversation after its first turn (AUTO_TITLE, default false)",
    ),
    "--webhook-url": (
        "WEBHOOK_URL",
        "http(s) URL that gets a signed POST when a background answer ends; needs "
        "WEBHOOK_SECRET (at least 16 characters), see also WEBHOOK_TIMEOUT (default 10 s) and "
        "WEBHOOK_RETRIES (default 5) (WEBHOOK_URL, default: no webhook)",
    ),
    "--log-level": ("LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR (LOG_LEVEL, default INFO)"),
    "--log-format": ("LOG_FORMAT", "console or json (LOG_FORMAT, default console)"),
    "--log-file": ("LOG_FILE", "also log to this file, rotated at 10 MiB (LOG_FILE)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easybackend",
        # No abbreviated flags: a subcommand's flag (chat --conversation) would otherwise be
        # taken for a prefix of the server's (--conversation-ttl, --conversations-dir).
        allow_abbrev=False,
        description=(
            "ChatGPT-style conversations with server-side memory over HTTP, WebSocket and gRPC. "
            "Configuration comes from flags, the environment and ./.env (see README)."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server (the default command)")
    for target in (parser, serve):
        _add_serve_flags(target)
    chat = commands.add_parser(
        "chat",
        help="interactive terminal client: multi-line input, a blank line sends, Ctrl-C cancels "
        "the answer, /help lists the commands (/regenerate, /back, /branches)",
        description="Chat with a running EasyBackend. Type a prompt over several lines; a blank line "
        "sends it; the answer streams in. Ctrl-C cancels the answer in progress (or discards the prompt "
        "being typed); Ctrl-D quits. Input can be piped in. Commands, on a line of their own at the "
        "start of a prompt (over --protocol http): /regenerate answers the last prompt again as a new "
        "version; /back rolls back one turn, keeping it as a branch; /branches lists the versions of "
        "the last turn and moves the head to the one picked; /help lists them.",
    )
    chat.add_argument(
        "--protocol", choices=("http", "ws", "grpc"), default="http", help="protocol (default http)"
    )
    chat.add_argument(
        "--url",
        help="server address (default http://127.0.0.1:8000, ws://127.0.0.1:9001 or 127.0.0.1:9000)",
    )
    chat.add_argument(
        "--conversation", metavar="ID", help="conversation id to continue (default: a new one)"
    )

    importer = commands.add_parser(
        "import-json",
        help="import the original EasyBackend's conversations/*.json files (safe to run again)",
        description="Import every <conversation_id>.json file of DIR, as written by the original "
        "EasyBackend, into the database named by DATABASE_URL / CONVERSATIONS_DIR. Running it again "
        "adds only entries appended since; malformed files are named and skipped.",
    )
    importer.add_argument(
        "directory", metavar="DIR", help="folder holding the original's .json files"
    )
    exporter = commands.add_parser(
        "export",
        help="write one conversation as JSON",
        description="Write one conversation as JSON.",
    )
    exporter.add_argument("conversation_id", metavar="ID")
    exporter.add_argument(
        "--output", "-o", metavar="FILE", help="write to FILE instead of standard output"
    )
    migrator = commands.add_parser(
        "migrate-storage",
        help="copy every conversation from one database to another (SQLite <-> PostgreSQL)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Copy every conversation from the database --from names into the one --to
names, either way between SQLite and PostgreSQL: owner, id, system prompt,
settings, counters, times, all its turns, its summaries, and the import-json
bookkeeping; then the stored keys (as digests: the same secrets keep working)
and the usage per key, day and model (rows the target holds are kept, never
doubled). The source is not changed (beyond bringing its schema up to date,
as a server would).

Stop the servers using either database first. The target must hold no
conversations, unless --force. Prints one summary line; on failure, one
error line and a non-zero exit. PG_POOL_SIZE and PG_POOL_TIMEOUT apply.""",
        epilog="""\
example:
  easybackend migrate-storage --from sqlite:///conversations/easybackend.sqlite3 \\
      --to postgresql://easybackend:PASSWORD@db:5432/easybackend""",
    )
    migrator.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="URL",
        help="the database to copy from: sqlite:///PATH (must exist) or postgresql://…",
    )
    migrator.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="URL",
        help="the database to copy into: sqlite:///PATH (created if missing) or postgresql://…; "
        "its schema is created or migrated as a server would",
    )
    migrator.add_argument(
        "--force",
        action="store_true",
        help="copy even into a target that already holds conversations: a conversation in both "
        "is replaced by the source's copy, the target's other conversations are kept",
    )
    migrator.add_argument(
        "--env-file",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="read settings (PG_POOL_SIZE, PG_POOL_TIMEOUT) from this file instead of ./.env",
    )
    from . import keys_commands  # argparse only; what a command needs is imported when it runs

    keys_commands.add_parser(commands)
    from . import usage_commands

    usage_commands.add_parser(commands)
    lister = commands.add_parser(
        "upstreams",
        help="list the upstreams of CONFIG_FILE (or the one of OPENAI_BASE_URL) and their keys",
        description="Each upstream with its models, weight, proxy (shown as set or not) and its "
        "keys, each as its number and last four characters. The keys' live state (cooling "
        "down, rejected) is in the running server's /readyz.",
    )
    lister.add_argument(
        "--config", dest="CONFIG_FILE", default=argparse.SUPPRESS, metavar="PATH",
        help="the configuration file (CONFIG_FILE)",
    )  # fmt: skip
    lister.add_argument(
        "--env-file", default=argparse.SUPPRESS, metavar="PATH",
        help="read settings from this file instead of ./.env",
    )  # fmt: skip
    for command in (importer, exporter):
        for flag in ("--conversations-dir", "--database-url"):
            variable, text = SERVE_FLAGS[flag]
            command.add_argument(
                flag, dest=variable, default=argparse.SUPPRESS, metavar=variable, help=text
            )
        command.add_argument(
            "--env-file",
            default=argparse.SUPPRESS,
            metavar="PATH",
            help="read settings from this file instead of ./.env",
        )
    return parser


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--demo",
        action="store_true",
        default=argparse.SUPPRESS,
        help="answer from the built-in fake model on loopback: no API key, no network needed",
    )
    parser.add_argument(
        "--env-file",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="read settings from this file instead of ./.env",
    )
    for flag, (variable, text) in SERVE_FLAGS.items():
        parser.add_argument(
            flag, dest=variable, default=argparse.SUPPRESS, metavar=variable, help=text
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status.

    When serving, SIGINT and SIGTERM are held back (blocked) from the first
    instant of the command until the server's own handler takes them over:
    one sent while the command is still importing or binding its ports is
    not lost and does not kill the process, it stops the start-up (exit 0).
    The other commands get the usual handling at once.
    """
    with _stop_signals_held():
        args = vars(build_parser().parse_args(argv))
        command = args.pop("command", None)
        if command in (None, "serve"):
            return _serve(args)
    if command == "chat":
        from .client import main as chat_main

        return chat_main(args["protocol"], args["url"], args["conversation"])
    if command == "keys":
        from .keys_commands import main as keys_main

        return keys_main(args)
    if command == "usage":
        from .usage_commands import main as usage_main

        return usage_main(args)
    if command == "upstreams":
        return _upstreams_command(args)
    return _data_command(command, args)


@contextlib.contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM inside the block; one sent meanwhile waits, pending.

    ``serve()`` unblocks them once its handler is in place (and blocks them
    again on its way out). On leaving the block a signal still pending is
    dropped (the command is over anyway: it served and stopped, or its
    start-up failed and said why), then the mask is put back as it was.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, nothing to hold
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        for signum in signal.sigpending() & STOP_SIGNALS:  # standard signals: one pending each
            signal.sigwait({signum})
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(args: dict[str, str]) -> int:
    """The server, until it is stopped (0) or cannot start (1; 2 for bad configuration)."""
    import trio

    from .chat.tokens import UnknownEncoding
    from .errors import StorageUnavailable
    from .listeners import ListenError
    from .logs import configure_logging, redact, secrets_of
    from .settings import ConfigError, load_settings

    demo = bool(args.pop("demo", False))
    env_file = args.pop("env_file", ".env")
    try:
        settings = load_settings(args, env_file=env_file, demo=demo)
    except ConfigError as exc:
        print(f"easybackend: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    from .transports._compat import UnsupportedLibraryVersion

    try:
        from .app import serve
    except UnsupportedLibraryVersion as exc:  # a library whose private parts we override
        print(f"easybackend: error: {exc}", file=sys.stderr)
        return 1

    try:
        trio.run(serve, settings)
    except (ConfigError, ListenError, StorageUnavailable, UnknownEncoding) as exc:
        print(f"easybackend: error: {redact(str(exc), secrets_of(settings))}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


def _data_command(command: str, args: dict[str, str]) -> int:
    """import-json, export and migrate-storage: storage work that never calls the model."""
    import trio

    from . import data_commands
    from .errors import StorageUnavailable
    from .settings import ConfigError, load_settings

    env_file = args.pop("env_file", ".env")
    positional = {
        key: args.pop(key)
        for key in ("directory", "conversation_id", "output", "source", "target", "force")
        if key in args
    }
    try:
        settings = load_settings(args, env_file=env_file, need_api_key=False)
        return trio.run(data_commands.COMMANDS[command], settings, positional)
    except (ConfigError, StorageUnavailable, data_commands.CommandError) as exc:
        print(f"easybackend: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


def _upstreams_command(args: dict[str, str]) -> int:
    """Print the configured upstreams, one line each, then one indented line per key."""
    from .settings import ConfigError, load_settings
    from .upstream.config import shown_key

    env_file = args.pop("env_file", ".env")
    try:
        settings = load_settings(args, env_file=env_file, need_api_key=False)
    except ConfigError as exc:
        print(f"easybackend: error: {exc}", file=sys.stderr)
        return 2
    if not settings.upstreams:
        base_url = settings.openai_base_url or "https://api.openai.com/v1"
        print(f"default  {base_url}  models: every model  (no CONFIG_FILE)")
        keys = [settings.openai_api_key] if settings.openai_api_key else []
        for index, key in enumerate(keys):
            print(f"  key {shown_key(index, key)}")
        return 0
    for upstream in settings.upstreams:
        extra = [f"weight {upstream.weight:g}"]
        if upstream.max_concurrency:
            extra.append(f"at most {upstream.max_concurrency} at once")
        if upstream.proxy:
            extra.append("through a proxy")
        if upstream.kind != "openai":
            extra.append(upstream.kind)
        print(
            f"{upstream.name}  {upstream.base_url}  models: {', '.join(upstream.models)}  "
            + ", ".join(extra)
        )
        for index, key in enumerate(upstream.api_keys):
            print(f"  key {shown_key(index, key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
