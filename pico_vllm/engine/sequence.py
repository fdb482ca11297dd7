"""A request's state as the scheduler sees it: its tokens, its KV blocks, how far it has got."""

from __future__ import annotations

import enum

from pico_vllm.sampling_params import SamplingParams

# The id a sampled token has between the step that computes it and the moment the host reads it
# back (asynchronous scheduling): the next step already runs with the real id, taken on the device.
PLACEHOLDER = -1
# A block-table entry whose block a sliding-window group has given back: every query to come
# attends past it (the runner points it at the scratch block, which is never read there).
NO_BLOCK = -1


class SequenceStatus(enum.Enum):
    """WAITING -> RUNNING -> (PREEMPTED -> RUNNING ->) FINISHED.

    A PREEMPTED sequence lost its KV blocks and waits at the front of the queue to be
    recomputed (prompt and the tokens it had generated alike).
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


class OutputTokens:
    """The output part of ``token_ids`` (after ``num_prompt_tokens``): for a ``Sequence`` and for
    the views of it that the sampler sees (``speculative.DraftPosition``)."""

    token_ids: list[int]
    num_prompt_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class Sequence(OutputTokens):
    """One request: prompt + generated tokens, and the pool blocks holding their K/V: one block
    table per layer group (see ``BlockManager``), ``block_tables[g][i]`` holding tokens
    ``[i * block_size, (i + 1) * block_size)`` of group ``g``'s layers."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V is in the pool
        self.num_cached_tokens = 0  # of those, served by the prefix cache at (re)admission
        self.block_tables: list[list[int]] = [[]]
        # SHA-256 digest of each full block whose tokens are known, chained (see BlockManager):
        # what the prefix cache files a block under, whichever group's block it is.
        self.block_hashes: list[bytes] = []
        self.status = SequenceStatus.WAITING
        # A hybrid model's: the state-pool slot its linear layers' state lives in while it runs.
        self.state_slot: int | None = None
        # An llguidance matcher following the output, for a request with structured outputs.
        self.grammar = None
        # Speculative decoding: the client's predicted output tokens (a draft source), drafts
        # verified and kept, drafts rejected in a row, and steps left without drafting.
        self.prediction: list[int] | None = None
        self.draft_kv_tokens: list[int] = []  # a draft model's: the tokens its pool holds K/V of
        self.num_draft_tokens = 0
        self.num_accepted_draft_tokens = 0
        self.draft_failures = 0
        self.draft_pause = 0
        self.draft_limit: int | None = None  # drafts to try next step (None: the proposer's most)

    @property
    def block_table(self) -> list[int]:
        """The first group's block table: the only one where every layer attends alike."""
        return self.block_tables[0]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    # Async scheduling: a token sampled by a step not yet read back is a placeholder in
    # ``token_ids`` until the host learns it. These four methods are all that touch one.
    def append_placeholder(self) -> None:
        """A token was sampled on the device; its id reaches the host later."""
        self.token_ids.append(PLACEHOLDER)

    def fill_placeholder(self, index: int, token_id: int) -> None:
        """The host learned the token sampled at ``index``."""
        assert self.token_ids[index] == PLACEHOLDER, (self, index)
        self.token_ids[index] = token_id

    def is_pending(self, index: int = -1) -> bool:
        """Whether the token at ``index`` (default: the newest) is still on its way to the host."""
        return self.token_ids[index] == PLACEHOLDER

    def has_pending(self, start: int, end: int) -> bool:
        """Whether any token in ``token_ids[start:end]`` is still on its way to the host."""
        return PLACEHOLDER in self.token_ids[start:end]

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_tables})"
        )
