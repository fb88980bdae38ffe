"""Python runs this at start-up when tests/test_interrupt.py puts this folder on
PYTHONPATH. It writes one byte to the file descriptor REKKORD_TEST_READY_FD
once rekkord's first Ctrl-C handler is in place (interrupt.exit_at_once has
returned), so the test's clock starts where rekkord's own handling starts,
however slowly CPython started on a loaded machine."""

import os
import sys

_fd = int(os.environ.pop("REKKORD_TEST_READY_FD", "-1"))


def _watch(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
    if event == "return" and frame.f_code.co_name == "exit_at_once":
        sys.setprofile(None)
        os.write(_fd, b"!")
        os.close(_fd)


if _fd >= 0:
    sys.setprofile(_watch)
