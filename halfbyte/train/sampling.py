"""Windows of tokens for training (TokenSampler: a global order dealt to the ranks) and evaluation
(eval_batches: a fixed set spread over the whole file)."""

from __future__ import annotations

import numpy as np
import torch

from halfbyte.train.data import TokenFile, TokenFileError


class TokenSampler:
    """Training windows of `seq_len + 1` tokens for one rank.

    The file is cut into non-overlapping windows; each epoch shuffles all of them with the same seed on
    every rank, and rank r takes every world-th window of that order. So ranks never share a window, the
    global batch is a uniform sample whatever the world size, and (epoch, index) resumes exactly.
    """

    def __init__(self, data: TokenFile, seq_len: int, rank: int, world_size: int, seed: int):
        self.data, self.seq_len, self.rank, self.world_size, self.seed = data, seq_len, rank, world_size, seed
        self.num_windows = (len(data) - 1) // seq_len
        self.per_rank = self.num_windows // world_size
        if self.per_rank < 1:
            raise TokenFileError(
                f"{data.path} has {len(data)} tokens: too few for {world_size} ranks at seq_len {seq_len}"
            )
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
        return perm[self.rank :: self.world_size][: self.per_rank]

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = []
        for _ in range(batch_size):
            if self.index == self.per_rank:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order()
            starts.append(int(self._order[self.index]) * self.seq_len)
            self.index += 1
        return windows_to_batch(self.data.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """The position in the global order (the same on every rank: all ranks draw alike), so a
        run can resume on another number of ranks and see the windows that come next."""
        return {"epoch": self.epoch, "consumed": self.index * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # another seed deals other windows: keep the epoch count, start it afresh
        self.epoch = int(state["epoch"])
        self.index = min(-(-int(state["consumed"]) // self.world_size), self.per_rank) \
            if state.get("seed") == self.seed else 0
        self._order = self._epoch_order()


def windows_to_batch(tokens: np.ndarray, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    block = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]))
    return block[:, :-1], block[:, 1:]


def eval_batches(
    data: TokenFile, seq_len: int, rank: int, world_size: int, batch_size: int, windows: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: `windows` windows spread evenly over the whole file (the same set for
    every world size and batch size, so runs of any layout evaluate the same tokens), window k going
    to rank k % world_size, in micro-batches of `batch_size`."""
    num_windows = (len(data) - 1) // seq_len
    n = min(windows, num_windows)
    starts = [(k * num_windows // n) * seq_len for k in range(rank, n, world_size)]
    return [windows_to_batch(data.tokens, starts[i : i + batch_size], seq_len)
            for i in range(0, len(starts), batch_size)]
