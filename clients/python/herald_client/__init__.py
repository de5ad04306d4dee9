"""herald client helpers for Python.

Today: :class:`RedisPublisher`, for workers that publish their sessions' events into a
herald cluster through Redis instead of HTTP.
"""

from .redis_publisher import RedisPublisher

__all__ = ["RedisPublisher"]
