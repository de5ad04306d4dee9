"""Typed session events.

Every event has ``seq``, ``session_id``, ``timestamp``, the SPEC fields in snake_case,
``extra`` (any field herald or a producer sent that is not a known one, verbatim) and
``raw`` (the payload as received).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Union


@dataclass(frozen=True, kw_only=True)
class PromptCounts:
    total: int = 0
    completed: int = 0
    processing: int = 0
    pending: int = 0
    failed: int = 0


@dataclass(frozen=True, kw_only=True)
class SessionEvent:
    event: ClassVar[str] = ""
    session_id: str
    seq: Optional[int]
    timestamp: str
    extra: Dict[str, Any] = field(default_factory=dict)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class Progress(SessionEvent):
    event: ClassVar[str] = "progress"
    status: str
    progress: float
    prompts: PromptCounts = field(default_factory=PromptCounts)
    has_clarifications: bool = False
    clarification_count: int = 0
    has_result: Optional[bool] = None
    result: Optional[Dict[str, Any]] = None


@dataclass(frozen=True, kw_only=True)
class ModelResult(SessionEvent):
    event: ClassVar[str] = "model_result"
    prompt_id: str
    model_name: str
    status: str
    provider: Optional[str] = None
    duration: Optional[float] = None
    result: Optional[str] = None
    error: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Clarification(SessionEvent):
    event: ClassVar[str] = "clarification"
    clarification_id: str
    question: str
    status: str
    answer: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class Completed(SessionEvent):
    event: ClassVar[str] = "completed"
    result: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Error(SessionEvent):
    event: ClassVar[str] = "error"
    error: str
    code: Optional[str] = None


Event = Union[Progress, ModelResult, Clarification, Completed, Error]

# wire name -> (class, {camelCase field: snake_case attribute})
_COMMON = {"sessionId": "session_id", "seq": "seq", "timestamp": "timestamp"}
_FIELDS: Dict[str, Dict[str, str]] = {
    "progress": {"status": "status", "progress": "progress", "prompts": "prompts",
                 "hasClarifications": "has_clarifications", "clarificationCount": "clarification_count",
                 "hasResult": "has_result", "result": "result"},
    "model_result": {"promptId": "prompt_id", "modelName": "model_name", "provider": "provider",
                     "duration": "duration", "result": "result", "status": "status", "error": "error"},
    "clarification": {"clarificationId": "clarification_id", "question": "question",
                      "status": "status", "answer": "answer"},
    "completed": {"result": "result"},
    "error": {"error": "error", "code": "code"},
}
_CLASSES = {"progress": Progress, "model_result": ModelResult, "clarification": Clarification,
            "completed": Completed, "error": Error}
_REQUIRED_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "progress": {"status": "", "progress": 0},
    "model_result": {"prompt_id": "", "model_name": "", "status": ""},
    "clarification": {"clarification_id": "", "question": "", "status": ""},
    "completed": {},
    "error": {"error": ""},
}

EVENT_NAMES = tuple(_CLASSES)


def parse_event(name: str, data: Mapping[str, Any]) -> Event:
    """Builds the typed event for a payload herald sent (or a history entry's ``data``)."""
    cls = _CLASSES[name]
    known = {**_COMMON, **_FIELDS[name]}
    kwargs: Dict[str, Any] = {"session_id": "", "seq": None, "timestamp": ""}
    kwargs.update(_REQUIRED_DEFAULTS[name])
    extra: Dict[str, Any] = {}
    for key, value in data.items():
        attr = known.get(key)
        if attr is None:
            extra[key] = value
        elif attr == "prompts" and isinstance(value, Mapping):
            kwargs[attr] = PromptCounts(**{k: value.get(k, 0) for k in ("total", "completed", "processing", "pending", "failed")})
        else:
            kwargs[attr] = value
    return cls(extra=extra, raw=dict(data), **kwargs)
