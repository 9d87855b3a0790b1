"""The console script's first code: until a command sets its own handling, Ctrl-C exits quietly.

Importing the commands (torch, hivemind) takes a second or more; a SIGINT in that time would
otherwise end in a KeyboardInterrupt traceback from deep inside an import. An ignored SIGINT is
taken back too: a script's background job (`pmnode local-swarm &`) inherits it ignored, and its
`kill -INT` would then be lost until a command installed its own handler.
"""

import signal


def _interrupted(signum: int, frame: object) -> None:
    raise SystemExit(130)


def main() -> None:
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN):
        signal.signal(signal.SIGINT, _interrupted)
    from pmnode.cli.main import main as run

    run()


if __name__ == "__main__":
    main()
