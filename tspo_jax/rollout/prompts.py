"""The words the agent shows the policy (host side): the prompt template and the observation texts.

Every text lives here once, as a module constant that a function or `AgentConfig` field defaults to, so the
trainer binds them through gin (e.g. `AgentConfig.invalid_action_text = "..."`) without touching code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# SPEC §2: one user message; reason in <think>, search with <search>, results in <information>, answer in <answer>.
PROMPT_TEMPLATE = (
    "Answer the question below. Reason step by step inside <think> and </think> whenever you get new information. "
    "If you lack some knowledge, you may call a search engine by writing <search> your query </search>; "
    "its results are given back to you between <information> and </information>. "
    "Search as often as you need. When you know the answer, write only the final answer inside <answer> and "
    "</answer>, without explanation, for example <answer> Ottawa </answer>.\n"
    "Question: {question}\n"
)

# After a turn with neither </search> nor </answer>.
INVALID_ACTION_TEXT = (
    "\n\nThat was not a valid action: to search, write a query between <search> and </search>; to finish, "
    "write the final answer between <answer> and </answer>.\n\n"
)

# In place of search results when the retrieval service failed (after the client's own retries).
SEARCH_FAILED_TEXT = "\n\n<information>The search failed: the search engine did not answer.</information>\n\n"

# Appended to the observation before the final turn, in which searching is disabled.
FINAL_TURN_TEXT = "No searches are left. Give your final answer now between <answer> and </answer>.\n\n"

OBSERVATION_OPEN = "\n\n<information>"
OBSERVATION_CLOSE = "</information>\n\n"


class Document(Protocol):
    """What the agent reads from a retrieved document (retrieval_service.client.Document has it)."""

    title: str
    text: str


def build_prompt_messages(question: str, template: str = PROMPT_TEMPLATE) -> list[dict]:
    """The chat messages of one question: a single user message made from `template`."""
    if "{question}" not in template:
        raise ValueError("prompt template has no {question} placeholder")
    return [{"role": "user", "content": template.replace("{question}", question.strip())}]


def format_documents(documents: Sequence[Document]) -> str:
    """`Doc 1(Title: "t") text\\nDoc 2(Title: "t") text` — the body of an observation (SPEC §2).

    Search-R1's own text: it shows the first line of each hit's wiki-18 `contents` (`"Title"`, quotes included) as
    the title, which is also what Search-R1 tools read from our HTTP API; a policy trained there sees the same words
    here."""
    return "\n".join(f'Doc {rank}(Title: "{doc.title}") {doc.text}' for rank, doc in enumerate(documents, start=1))
