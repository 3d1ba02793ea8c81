"""The prompt registry: versioned, labelled, sandbox-rendered prompts, and the gateway's cache of them."""

from keel.prompts.cache import PromptCache, prompts_channel
from keel.prompts.model import LabelState, Variable, Version
from keel.prompts.registry import PromptRegistry, label_from_dict, version_from_dict
from keel.prompts.render import CompiledPrompt, Rendered, render
from keel.prompts.selection import choose_version, sticky_fraction

__all__ = [
    "CompiledPrompt",
    "LabelState",
    "PromptCache",
    "PromptRegistry",
    "Rendered",
    "Variable",
    "Version",
    "choose_version",
    "label_from_dict",
    "prompts_channel",
    "render",
    "sticky_fraction",
    "version_from_dict",
]
