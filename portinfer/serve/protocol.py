"""The OpenAI API as pydantic models: requests in, responses out, and the error shape, in one place.

Requests take OpenAI's fields with OpenAI's meanings, plus the extensions local servers share
(top_k, min_p, repetition_penalty). Every validation failure (pydantic's, or a check below)
becomes one APIError, answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered to the client in OpenAI's shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message, param=None, code=None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def validation_error(errors) -> APIError:
    """pydantic's errors (FastAPI's RequestValidationError.errors()) -> one 400 naming the first field."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return bad_request(f"{param + ': ' if param else ''}{msg}{more}", param, "invalid_value")


# ---------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both generation endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: Optional[str] = None
    # extensions (llama.cpp's server, vLLM)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    ignore_eos: bool = False  # vLLM's: generate max_tokens whatever the model says (load generators)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request(f"stop: expected up to 4 non-empty strings, got {self.stop!r}", "stop")
        return stops


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None

    def text(self, index: int) -> str:
        """The content as text (a list of parts: its text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content[{j}]: only text parts are supported, got "
                                  f"type {part.get('type')!r}", f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs: requires logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def prompts(self) -> list:
        """The prompt(s) as a list of str or of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(t, int) for t in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or any(len(q) == 0 for q in prompts):
            raise bad_request("prompt: expected a non-empty string, token list, or a list of them", "prompt")
        if self.echo:
            raise bad_request("echo: not supported by this server", "echo")
        if self.suffix:
            raise bad_request("suffix: not supported by this server", "suffix")
        if self.best_of not in (None, 1, self.n):
            raise bad_request("best_of: not supported by this server (only best_of = n)", "best_of")
        return prompts

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return self.logprobs


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


# ---------------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def chat_logprobs(entries) -> dict:
    """entries: per token (token text, logprob, [(alt text, alt logprob), ...]) -> chat's logprobs object."""
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": list(a.encode("utf-8"))}
                                          for a, alp in alts]} for t, lp, alts in entries]}


def completion_logprobs(entries, text_offset0: int = 0) -> dict:
    """entries as above -> the legacy completions' logprobs object."""
    offsets, at = [], text_offset0
    for t, _, _ in entries:
        offsets.append(at)
        at += len(t)
    return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [dict(alts) for _, _, alts in entries], "text_offset": offsets}
