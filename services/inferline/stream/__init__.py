"""Stream inference: events scored as they arrive from a stream, results published to a stream."""

from inferline.stream.errors import StreamError, StreamInputError, StreamUnavailable
from inferline.stream.spec import StreamSpec

__all__ = ["StreamError", "StreamInputError", "StreamSpec", "StreamUnavailable"]
