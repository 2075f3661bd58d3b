"""Failure classes of the data path (all MorphMLPError, so jobs report them as one-line errors)."""

from morphmlp.errors import MorphMLPError


class IndexSchemaError(MorphMLPError):
    """A video index that can't be used: missing column, wrong type, null or out-of-range value."""


class BadDataError(MorphMLPError):
    """More unreadable videos than the configured threshold allows."""


class VideoDecodeError(MorphMLPError):
    """One video that can't be read; `reason` is one of REASONS (the bad-data report's column)."""

    REASONS = (
        "missing",  # no such file
        "empty",  # zero bytes
        "not_video",  # not a media container FFmpeg recognises
        "no_video_stream",  # a container without a video stream (e.g. audio only)
        "truncated",  # cut short: header unreadable, or fewer frames than the index promises
        "unreadable_stream",  # the video stream fails to decode
        "io_error",  # storage error other than a missing file
    )

    def __init__(self, uri: str, reason: str, detail: str):
        assert reason in self.REASONS, reason
        self.uri = uri
        self.reason = reason
        self.detail = detail
        super().__init__(f"{uri}: {reason}: {detail}")
