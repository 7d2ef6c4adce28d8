"""What every stage script shares: a clean exit for problems the user can fix."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from triage.config import ParamsError
from triage.schema import DataError


def run_stage(main: Callable[[], None], name: str, user_errors: tuple[type[Exception], ...] = ()) -> None:
    """Run ``main``; bad params or data end the stage with one clear line and exit 1, not a traceback.

    SIGTERM becomes a normal exit so that temp files and staged directories are cleaned up.
    """
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        main()
    except (ParamsError, DataError, *user_errors) as exc:
        sys.exit(f"[{name}] error: {exc}")
