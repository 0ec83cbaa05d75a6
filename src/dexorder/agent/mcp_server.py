"""FastMCP with a cheaper ``tools/call``: each output schema is checked and compiled once.

The SDK's low-level ``tools/call`` handler checks a tool's structured result with
``jsonschema.validate``, which first validates the *schema* against the JSON Schema
meta-schema on every call: about a tenth of the agent's CPU per call. :class:`AgentMCP`
installs a handler that does what the SDK's does (same results, same error texts, same
validation) but keeps one compiled validator per tool, made when the tools are first
called and made anew whenever a tool is added or removed.

:func:`quiet_sdk_request_log` keeps the SDK's INFO line for every request out of the log
unless the agent runs at DEBUG: writing it cost about 6% of the agent's CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, cast

from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from mcp import types
from mcp.server.fastmcp import FastMCP
from mcp.shared.exceptions import UrlElicitationRequiredError

logger = logging.getLogger(__name__)

# The logger behind the SDK's "Processing request of type ..." line, one per request.
SDK_REQUEST_LOGGER = "mcp.server.lowlevel.server"


def quiet_sdk_request_log(agent_log_level: str) -> None:
    """Log the SDK's per-request lines only when the agent itself logs at DEBUG.

    At INFO the SDK's request logger logs warnings and worse; at a stricter agent level
    it follows that level.
    """
    agent_level = logging.getLevelNamesMapping()[agent_log_level.upper()]
    level = agent_level if agent_level <= logging.DEBUG else max(agent_level, logging.WARNING)
    logging.getLogger(SDK_REQUEST_LOGGER).setLevel(level)


def compile_output_validator(schema: dict[str, Any]) -> Validator:
    """The validator ``jsonschema.validate`` would build, checked against its meta-schema once.

    Raises ``jsonschema.SchemaError`` for a schema that is not valid JSON Schema, as
    ``jsonschema.validate`` would on each call.
    """
    validator_class = validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


class AgentMCP(FastMCP[Any]):
    """FastMCP whose ``tools/call`` validates output with validators compiled once per tool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Tool name -> its output schema (None for a tool without one), read from the tool
        # list when a call first needs it and read again after a tool is added or removed.
        self._output_schemas: dict[str, dict[str, Any] | None] | None = None
        # Tool name -> the compiled validator of that schema, made on the tool's first result.
        self._output_validators: dict[str, Validator] = {}
        super().__init__(*args, **kwargs)

    def _setup_handlers(self) -> None:
        super()._setup_handlers()
        # Replaces the handler the SDK registered, which calls jsonschema.validate.
        self._mcp_server.request_handlers[types.CallToolRequest] = self._handle_call_tool

    def add_tool(
        self,
        fn: types.AnyFunction,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        annotations: types.ToolAnnotations | None = None,
        icons: list[types.Icon] | None = None,
        meta: dict[str, Any] | None = None,
        structured_output: bool | None = None,
    ) -> None:
        super().add_tool(
            fn,
            name=name,
            title=title,
            description=description,
            annotations=annotations,
            icons=icons,
            meta=meta,
            structured_output=structured_output,
        )
        self._forget_output_schemas()

    def remove_tool(self, name: str) -> None:
        super().remove_tool(name)
        self._forget_output_schemas()

    def _forget_output_schemas(self) -> None:
        self._output_schemas = None
        self._output_validators = {}

    async def _output_schema(self, tool_name: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the tool is listed, and its output schema if it has one."""
        if self._output_schemas is None or tool_name not in self._output_schemas:
            # Like the SDK, an unknown name makes the tool list be read again.
            listed = await self.list_tools()
            self._output_schemas = {tool.name: tool.outputSchema for tool in listed}
            self._output_validators = {}
        if tool_name not in self._output_schemas:
            logger.warning("Tool '%s' not listed, no validation will be performed", tool_name)
            return False, None
        return True, self._output_schemas[tool_name]

    def _output_validator(self, tool_name: str, schema: dict[str, Any]) -> Validator:
        validator = self._output_validators.get(tool_name)
        if validator is None:
            # A schema that is not valid JSON Schema raises here on each call, as in the SDK,
            # and is never cached.
            validator = compile_output_validator(schema)
            self._output_validators[tool_name] = validator
        return validator

    async def _handle_call_tool(self, request: types.CallToolRequest) -> types.ServerResult:
        """The SDK's low-level ``tools/call`` handler, less the per-call schema check."""
        try:
            tool_name = request.params.name
            listed, schema = await self._output_schema(tool_name)
            # Typed as content or a dict, FastMCP.call_tool also returns (content, structured)
            # for a tool with an output schema; every shape the SDK handles is handled here.
            results: object = await self.call_tool(tool_name, request.params.arguments or {})

            unstructured: Iterable[types.ContentBlock]
            structured: dict[str, Any] | None
            if isinstance(results, types.CallToolResult | types.CreateTaskResult):
                return types.ServerResult(results)
            if isinstance(results, tuple) and len(results) == 2:
                unstructured, structured = cast(
                    tuple[Iterable[types.ContentBlock], dict[str, Any]], results
                )
            elif isinstance(results, dict):
                structured = results
                unstructured = [types.TextContent(type="text", text=json.dumps(results, indent=2))]
            elif isinstance(results, Iterable):
                unstructured, structured = results, None
            else:
                return _error_result(f"Unexpected return type from tool: {type(results).__name__}")

            if listed and schema is not None:
                if structured is None:
                    return _error_result(
                        "Output validation error: outputSchema defined but no structured "
                        "output returned"
                    )
                validator = self._output_validator(tool_name, schema)
                error = best_match(validator.iter_errors(structured))
                if error is not None:
                    return _error_result(f"Output validation error: {error.message}")

            return types.ServerResult(
                types.CallToolResult(
                    content=list(unstructured), structuredContent=structured, isError=False
                )
            )
        except UrlElicitationRequiredError:
            # The SDK turns it into its own JSON-RPC error (-32042), as for its own handler.
            raise
        except Exception as error:
            return _error_result(str(error))


def _error_result(message: str) -> types.ServerResult:
    return types.ServerResult(
        types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)
    )
