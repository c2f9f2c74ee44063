"""An OpenAI-compatible chat endpoint: one chat completion through the official ``openai`` client.

:class:`ChatEndpoint` sends one request with a per-request timeout and its own retry loop: rate
limits (429), server errors (5xx), 408/409, timeouts and connection errors are retried with
exponential backoff ``min(backoff_max, backoff_base * 2**attempt) * uniform(0.5, 1)`` (a
``Retry-After`` header, when the server sends one, is honoured up to ``backoff_max``). The response
body is parsed here, so a malformed answer (not JSON, no ``choices``, no string ``content``) raises
:class:`MalformedAnswerError` naming the prompt row; an empty or whitespace-only answer is such a
failure too, never a row. A 401/403 (a wrong or unauthorised key) raises
:class:`AuthenticationError` and every later request of the endpoint fails at once without being
sent, so a bad key costs one request, not one per prompt. The API key is read from an environment
variable and only ever handed to the client; error texts have it replaced by ``***`` (servers may
echo it), so it is never printed or written.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass

RETRYABLE_STATUS = (408, 409, 429)


class EndpointError(RuntimeError):
    """A request that failed for good (a non-retryable HTTP error, or retries exhausted)."""


class MalformedAnswerError(EndpointError):
    """The endpoint answered 200 with a body that is not a usable chat completion (or an empty answer)."""


class AuthenticationError(EndpointError):
    """HTTP 401/403: the key is wrong or lacks access; nothing more is sent to this endpoint."""


def redact(text: str, secret: str) -> str:
    """``text`` with ``secret`` replaced by ``***`` (pure; a short or empty secret is left alone)."""
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def read_api_key(env_name: str) -> str:
    """The API key from the environment variable ``env_name``; raises naming the variable (never the key)."""
    if not env_name:
        raise ValueError("no API-key environment variable named (--api-key-env)")
    key = os.environ.get(env_name, "")
    if not key:
        raise ValueError(
            f"environment variable {env_name} is not set; put the endpoint's API key there "
            f"(for a local server without authentication any value works, e.g. {env_name}=EMPTY)"
        )
    return key


@dataclass
class SamplingSettings:
    """Sampling fields sent with every request; ``None`` leaves the endpoint's default."""

    temperature: float | None = None
    max_tokens: int | None = 2048
    top_p: float | None = None
    seed: int | None = None

    def request_fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class ChatCompletion:
    content: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def parse_completion_body(text: str, where: str) -> ChatCompletion:
    """Parse a chat-completions response body; raise :class:`MalformedAnswerError` naming ``where``."""
    head = text[:200].replace("\n", " ")
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        raise MalformedAnswerError(f"{where}: the endpoint's answer is not JSON (body starts: {head!r})") from None
    if not isinstance(body, dict):
        raise MalformedAnswerError(f"{where}: the endpoint's answer is not a JSON object (body starts: {head!r})")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedAnswerError(f"{where}: the endpoint's answer has no 'choices' (body starts: {head!r})")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise MalformedAnswerError(f"{where}: the endpoint's answer has no 'choices[0].message' (body starts: {head!r})")
    content = message.get("content")
    if not isinstance(content, str):
        raise MalformedAnswerError(
            f"{where}: the endpoint's answer has no string 'choices[0].message.content' "
            f"(got {type(content).__name__}; body starts: {head!r})"
        )
    if not content.strip():
        raise MalformedAnswerError(f"{where}: the endpoint's answer is empty (finish_reason="
                                   f"{choice.get('finish_reason')!r}); not kept as teacher data")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return ChatCompletion(
        content=content,
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint with timeouts and retries (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        sampling: SamplingSettings | None = None,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        from openai import OpenAI

        self.base_url, self.model = base_url, model
        self.sampling = sampling or SamplingSettings()
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        if max_retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError(f"max_retries must be >= 0, timeout > 0 and backoffs >= 0; got {max_retries}, {timeout}, "
                             f"{backoff_base}, {backoff_max}")
        # The client's own retries are off: this class retries, counts and backs off itself.
        self._key = read_api_key(api_key_env)
        self._client = OpenAI(api_key=self._key, base_url=base_url, timeout=timeout, max_retries=0)
        self._lock = threading.Lock()
        self.refused: AuthenticationError | None = None
        """The first 401/403; once set, no further request is sent."""
        self.retries = 0
        """Retried attempts so far, all requests together."""

    def _backoff_seconds(self, attempt: int, error) -> float:
        delay = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = min(self.backoff_max, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return delay

    def complete(self, messages: list, where: str = "request", **overrides) -> ChatCompletion:
        """One chat completion for ``messages``; ``where`` names the prompt in errors (which never
        hold the API key)."""
        if self.refused is not None:
            raise AuthenticationError(f"{where}: not sent: {self.refused}")
        try:
            return self._complete(messages, where, **overrides)
        except EndpointError as err:
            safe = type(err)(redact(str(err), self._key))
            if isinstance(err, AuthenticationError):
                with self._lock:
                    self.refused = self.refused or safe
            raise safe from None

    def _complete(self, messages: list, where: str, **overrides) -> ChatCompletion:
        import openai

        fields = {**self.sampling.request_fields(), **{k: v for k, v in overrides.items() if v is not None}}
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            retry_error = None
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model, messages=messages, **fields
                )
                return parse_completion_body(raw.http_response.text, where)
            except openai.APIStatusError as err:
                status = err.status_code
                last_problem = f"HTTP {status}: {err.message}"
                if status in (401, 403):
                    raise AuthenticationError(
                        f"{where}: the endpoint refused the API key ({last_problem}); check the key and "
                        "the model name, nothing more is sent") from None
                if status not in RETRYABLE_STATUS and status < 500:
                    raise EndpointError(f"{where}: the endpoint refused the request ({last_problem})") from None
                retry_error = err
            except openai.APITimeoutError:
                last_problem = f"no answer within the {self.timeout:g} s timeout"
            except openai.APIConnectionError as err:
                last_problem = f"connection error ({err.__cause__ or err})"
            if attempt == self.max_retries:
                break
            with self._lock:
                self.retries += 1
            time.sleep(self._backoff_seconds(attempt, retry_error))
        raise EndpointError(f"{where}: failed after {self.max_retries + 1} attempts; last error: {last_problem}")
