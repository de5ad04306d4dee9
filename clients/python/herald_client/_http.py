"""Shared HTTP helpers (paths and bodies of herald's HTTP API)."""

from __future__ import annotations

import re
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union
from urllib.parse import quote

PromptSpec = Union[str, Mapping[str, Any]]


def session_path(session_id: str) -> str:
    return quote(session_id, safe="")


def create_body(prompts: Iterable[PromptSpec], models: Optional[Iterable[str]], strategy: Optional[str],
                metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    body: Dict[str, Any] = {"prompts": [p if isinstance(p, str) else dict(p) for p in prompts]}
    if models is not None:
        body["models"] = list(models)
    if strategy is not None:
        body["strategy"] = strategy
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


_CAMEL = re.compile(r"_([a-z0-9])")


def camel(key: str) -> str:
    """``has_clarifications`` -> ``hasClarifications``; camelCase keys pass unchanged."""
    return _CAMEL.sub(lambda m: m.group(1).upper(), key)


def camel_fields(fields: Mapping[str, Any]) -> Dict[str, Any]:
    return {camel(k): v for k, v in fields.items()}


def ingest_item(event: str, data: Mapping[str, Any], idempotency_key: Optional[str]) -> Dict[str, Any]:
    return {"event": event, "data": dict(data), "idempotencyKey": idempotency_key or uuid.uuid4().hex}


def items_list(body: Any) -> List[Any]:
    return body if isinstance(body, list) else [body]
