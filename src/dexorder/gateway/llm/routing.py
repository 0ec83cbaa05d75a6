"""Each message to a model through LiteLLM's deployments, with fallbacks that never repeat text.

Every deployment of the model list is named ``<group>:<index>`` (``standard:0``, ``standard:1``...),
so the order a route tries them in is exact. ``ModelRouter.choose`` picks the route of a message
(``dexorder.gateway.pure.routing.choose_route``: tier, then preference, then complexity) and counts it;
``ModelRouter.stream`` streams one model round along that route, walking its deployments in order.

Each deployment is called through one of two transports. Deployments whose provider speaks
OpenAI's streaming protocol (``openai/...``, ``openrouter/...``, any ``api_base`` serving it) are
streamed by ``gateway.llm.wire``, which parses the chunks' JSON and nothing more; litellm's
per-chunk models cost 25 times the CPU, and at a hundred concurrent replies that is the
gateway's bottleneck. Every other provider (and every deployment with ``transport="litellm"``)
is called through litellm's SDK, ``acompletion``, one deployment at a time. Not through
LiteLLM's Router: the walk, the cooldowns and the backoff are this module's, and the Router's
stream wrapper is a generator that, closed before its first chunk, leaves the provider's stream
open. Failures map to the same ``LLMError`` codes on both transports, so what follows holds for
each.

What fails over, and how:
- A timeout, a 429, a 5xx, a refused connection or an overflowing context window before the
  reply's first token: the next deployment is tried at once (another deployment is another
  server, so there is nothing to wait for); one ``Fallback`` says who answers instead. The failed one cools down: for
  ``cooldown_seconds`` (or its Retry-After, if longer) the next messages try it last, never
  skip it, so a route never loses capacity. When every deployment of the route has failed, the
  whole route is walked again after an exponential backoff (honouring a provider's Retry-After
  up to the cap), ``rounds`` times at most. Other errors (a bad request, a bad key) are raised.
- The same failures after text was streamed (the connection breaks, or the stream stalls past
  the timeout): **the text already shown stays, and is never sent again.** The next deployment
  of the route is asked to continue it: it gets the partial reply as the assistant's message and
  an instruction to go on from exactly where it stopped, and its tokens are appended. A
  ``Fallback`` event (``continued=True``) comes first, so the caller can tell the user, e.g. a
  ``status`` frame: "the connection to X broke; Y continues the reply". If no deployment is left,
  the ``LLMError`` is raised with ``after_output=True``: the partial text stays as shown and the
  caller reports the failure after it.
- A stream that breaks after tool-call fragments but before any text has shown the user
  nothing: the round restarts on the next deployment (``Fallback`` with ``continued=False``).

Usage is summed over the attempts that reported it; ``Finish.model`` names the deployment
that finished the round.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client import Counter

from dexorder.gateway import metrics
from dexorder.gateway.llm.adapter import (
    LLMError,
    LLMErrorCode,
    LLMEvent,
    RoundReader,
    TextDelta,
    Usage,
    litellm_request,
    load_litellm,
    wrap_error,
)
from dexorder.gateway.llm.wire import WireClient, WireTarget, wire_target
from dexorder.gateway.pure.routing import (
    LLMTarget,
    RouteChoice,
    RouteSource,
    allowed_groups,
    choose_route,
)

logger = logging.getLogger(__name__)

ROUTE_CHOICES = Counter(
    "dexorder_gateway_route_choices",
    "Routes chosen, by model group and by what decided them (preference or complexity).",
    ["group", "source"],
    registry=metrics.REGISTRY,
)
FALLBACKS = Counter(
    "dexorder_gateway_llm_fallbacks",
    "Model rounds taken over by another deployment, by the failed deployment and how.",
    ["deployment", "mode"],
    registry=metrics.REGISTRY,
)

CONTINUE_INSTRUCTION: Final = (
    "Your previous reply was cut off by a connection failure. Continue it from exactly where it "
    "stopped, without repeating anything already written and without mentioning the interruption."
)


@dataclass(frozen=True)
class RouterPolicy:
    """How patiently a route is walked."""

    timeout: float = 60.0
    """Bounds the connection and each wait for the next chunk, per deployment."""
    rounds: int = 2
    """Walks of the whole route before giving up, when every deployment fails before output."""
    backoff_seconds: float = 0.5
    """The wait before the second walk; it doubles for each further walk."""
    backoff_cap_seconds: float = 8.0
    cooldown_seconds: float = 30.0
    """How long a deployment that failed is tried last (a longer Retry-After wins)."""

    def backoff(self, walk: int, error: LLMError) -> float:
        """The wait after the ``walk``-th failed walk (0-based); a Retry-After lengthens it."""
        delay: float = self.backoff_seconds * 2.0**walk
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return min(delay, self.backoff_cap_seconds)


@dataclass(frozen=True)
class Fallback:
    """Another deployment took over the round.

    ``continued``: text had been shown, and the next deployment continues it (nothing is
    repeated); otherwise nothing had been shown and the round started over. ``code`` is the
    first failure's.
    """

    failed: str
    replacement: str | None
    continued: bool
    code: LLMErrorCode | None

    def notice(self) -> str:
        """What the user is told, when the caller shows it (a ``status`` frame)."""
        who = self.replacement or "another model"
        if self.continued:
            return f"The connection to {self.failed} broke; {who} continues the reply."
        return f"{self.failed} did not answer; {who} answers instead."


RoutedEvent = LLMEvent | Fallback


def deployment_name(group: str, index: int) -> str:
    return f"{group}:{index}"


Transport = Literal["auto", "litellm"]


class ModelRouter:
    """The gateway's routes over the model list's deployments, and the streams along them."""

    def __init__(
        self,
        groups: Mapping[str, Sequence[LLMTarget]],
        policy: RouterPolicy | None = None,
        *,
        transport: Transport = "auto",
    ) -> None:
        if not any(groups.values()):
            raise ValueError("the router needs at least one deployment")
        self.groups = {group: list(targets) for group, targets in groups.items()}
        self.policy = policy or RouterPolicy()
        self._litellm = load_litellm()
        self._cooling: dict[str, float] = {}  # deployment name -> when it is fresh again
        #: Deployment name -> its wire form, for the deployments streamed directly.
        self.wire: dict[str, WireTarget] = {}
        # litellm would send an OpenAI deployment without an api_base to the base URL in the
        # OpenAI SDK's environment variables; those deployments stay with litellm.
        openai_base_from_environment = any(
            os.environ.get(name) for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE")
        )
        if transport == "auto":
            for group, targets in self.groups.items():
                for index, target in enumerate(targets):
                    found = wire_target(target)
                    if found is None or (
                        openai_base_from_environment
                        and target.api_base is None
                        and found.provider == "openai"
                    ):
                        continue
                    self.wire[deployment_name(group, index)] = found
        self._wire_client = WireClient()

    async def close(self) -> None:
        """Close the wire transport's pooled connections."""
        await self._wire_client.close()

    def choose(
        self,
        text: str,
        *,
        licensed_groups: Sequence[str],
        tier: str,
        preferred_model: str | None = None,
    ) -> RouteChoice:
        """The route of one message (see ``choose_route``), counted in the metrics.

        ``licensed_groups`` is the effective license's ``model_groups``: the tier's, or what
        the license's features set instead. Raises ``RoutingError`` when none is configured.
        """
        choice = choose_route(
            text,
            groups=self.groups,
            allowed=allowed_groups(licensed_groups, self.groups),
            tier=tier,
            preferred_model=preferred_model,
        )
        ROUTE_CHOICES.labels(group=choice.group, source=choice.source.value).inc()
        return choice

    def route_to(self, group: str, reason: str) -> RouteChoice:
        """Every deployment of ``group``, in the model list's order: the route of work the
        gateway does itself (not counted with the messages' routes). ``KeyError`` for a
        group the model list does not define."""
        targets = self.groups[group]
        return RouteChoice(
            group=group,
            deployment=targets[0].model,
            order=tuple(range(len(targets))),
            reason=reason,
            source=RouteSource.FIXED,
        )

    def chain(self, choice: RouteChoice) -> list[str]:
        """The deployment names of a route, in the order they are tried: the route's order,
        with the deployments that are cooling down after a failure moved to the end."""
        names = [deployment_name(choice.group, index) for index in choice.order]
        now = time.monotonic()
        fresh = [name for name in names if self._cooling.get(name, 0.0) <= now]
        return fresh + [name for name in names if name not in fresh]

    def cool(self, names: Sequence[str], retry_after: float | None = None) -> None:
        """Try these deployments last for a while, after they failed."""
        seconds = max(self.policy.cooldown_seconds, retry_after or 0.0)
        if seconds <= 0:
            return
        until = time.monotonic() + seconds
        for name in names:
            self._cooling[name] = max(self._cooling.get(name, 0.0), until)

    def target_of(self, name: str) -> LLMTarget:
        group, _, index = name.rpartition(":")
        return self.groups[group][int(index)]

    def model_of(self, name: str) -> str:
        return self.target_of(name).model

    async def _open_one(
        self, name: str, messages: list[dict[str, Any]], tools: Sequence[Any] | None
    ) -> Any:
        """Open a stream on one deployment, through its transport."""
        wire = self.wire.get(name)
        if wire is not None:
            return await self._wire_client.open(
                wire, messages, tools=tools, timeout=self.policy.timeout
            )
        # No retries in the SDK: the next deployment is the retry; walks are ours (backoff).
        request = litellm_request(
            self.target_of(name), messages, tools, timeout=self.policy.timeout
        )
        return await self._litellm.acompletion(**request)

    async def _open(
        self,
        chain: Sequence[str],
        messages: list[dict[str, Any]],
        tools: Sequence[Any] | None,
        *,
        after_output: bool,
    ) -> tuple[str, Any, list[tuple[str, LLMError]]]:
        """Open a stream on the first deployment of ``chain`` that answers, with backoff.

        Returns the deployment that answered, its stream, and the failures before it.
        ``after_output``: the caller has already shown text of this round (a continuation).
        """
        failures: list[tuple[str, LLMError]] = []
        for walk in range(self.policy.rounds):
            walk_failures: list[LLMError] = []
            for name in chain:
                try:
                    return name, await self._open_one(name, messages, tools), failures
                except Exception as error:
                    wrapped = wrap_error(error, self._litellm, after_output=after_output)
                    if not wrapped.retryable:
                        # From its own cause: the wire's errors are raised as they are.
                        raise _failed(wrapped) from wrapped.__cause__
                    self.cool([name], wrapped.retry_after)
                    failures.append((name, wrapped))
                    walk_failures.append(wrapped)
            first = walk_failures[0]
            lines = first.message.strip().splitlines()
            first_line = lines[0] if lines else first.code.value
            models = ", ".join(self.model_of(name) for name in chain)
            logger.warning(
                "walk %d of %d over %s failed: %s", walk + 1, self.policy.rounds, models, first_line
            )
            if walk + 1 >= self.policy.rounds:
                failure = LLMError(
                    first.code,
                    f"no model of the route answered ({models}); the first said: {first_line}",
                    status=first.status,
                    retry_after=first.retry_after,
                    after_output=after_output,
                )
                failure.__cause__ = first  # before it is logged
                raise _failed(failure) from first
            # The longest Retry-After of the walk lengthens the wait (up to the cap).
            slowest = max(walk_failures, key=lambda failure: failure.retry_after or 0.0)
            await asyncio.sleep(self.policy.backoff(walk, slowest))
        raise AssertionError("unreachable: the last walk returns or raises")  # pragma: no cover

    async def stream(
        self,
        choice: RouteChoice,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> AsyncGenerator[RoutedEvent, None]:
        """Stream one model round along a route; see the module docstring for what is shown.

        Events as ``llm``'s (``TextDelta``..., then ``ToolCall``s, ``Usage``, ``Finish``),
        with a ``Fallback`` before any takeover. Closing the generator closes the
        upstream stream.
        """
        remaining = self.chain(choice)
        base = [dict(message) for message in messages]
        shown = ""  # the text the caller has received in this round, over every attempt
        usage = Usage(0, 0, 0)
        reported_usage = False
        while True:
            request = base
            if shown:
                request = [
                    *base,
                    {"role": "assistant", "content": shown},
                    {"role": "user", "content": CONTINUE_INSTRUCTION},
                ]
            answered, stream, failures = await self._open(
                remaining, request, tools, after_output=bool(shown)
            )
            reader = RoundReader()
            # From here the stream is ours to close, whatever happens, even if the caller
            # stops reading at the Fallback below.
            try:
                # Another deployment than the answering one failed first (on a later walk
                # the one that answers may have failed itself before: not a takeover).
                failed = next(((n, f) for n, f in failures if n != answered), None)
                if failed is not None:
                    FALLBACKS.labels(
                        deployment=self.model_of(failed[0]),
                        mode="continue" if shown else "restart",
                    ).inc()
                    yield Fallback(
                        failed=self.model_of(failed[0]),
                        replacement=self.model_of(answered),
                        continued=bool(shown),
                        code=failed[1].code,
                    )
                async for chunk in stream:
                    content = reader.read(chunk)
                    if content:
                        shown += content
                        yield TextDelta(content)
            except Exception as error:
                failure = wrap_error(error, self._litellm, after_output=bool(shown))
                rest = remaining[remaining.index(answered) + 1 :]
                if failure.retryable:
                    self.cool([answered], failure.retry_after)
                if not failure.retryable or not rest:
                    raise _failed(failure) from failure.__cause__
                continued = bool(shown)
                logger.warning(
                    "%s broke (%s); %s %s",
                    self.model_of(answered),
                    failure.code,
                    self.model_of(rest[0]),
                    "continues the reply" if continued else "takes the round",
                )
                FALLBACKS.labels(
                    deployment=self.model_of(answered),
                    mode="continue" if continued else "restart",
                ).inc()
                yield Fallback(
                    failed=self.model_of(answered),
                    replacement=self.model_of(rest[0]),
                    continued=continued,
                    code=failure.code,
                )
                remaining = rest
                continue
            finally:
                await _close(stream)
                if reader.usage is not None:
                    usage = usage + reader.usage
                    reported_usage = True
            for call in reader.tool_calls():
                yield call
            if reported_usage:
                yield usage
            yield reader.finish(self.model_of(answered))
            return


def _failed(failure: LLMError) -> LLMError:
    """``failure``, logged with its causes (the provider's own error, which the user is not
    shown) as the round gives up with it."""
    logger.warning("model round failed: %s", failure, exc_info=failure)
    return failure


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


__all__ = [
    "CONTINUE_INSTRUCTION",
    "FALLBACKS",
    "ROUTE_CHOICES",
    "Fallback",
    "ModelRouter",
    "RoutedEvent",
    "RouterPolicy",
    "Transport",
    "deployment_name",
]
