"""The hidden-state cache of Ladder Side-Tuning: the frozen backbone's ladder-layer outputs per
example (keyed by a hash of its unpadded tokens), so that later epochs skip the backbone."""

from __future__ import annotations

import hashlib

import torch


class HiddenStateCache:
    """Backbone hidden states of the ladder layers per example (unpadded), within ``max_bytes``."""

    def __init__(self, max_bytes: int, layers: list[int]):
        self.max_bytes = max_bytes
        self.layers = layers
        self.entries: dict[bytes, dict[int, torch.Tensor]] = {}
        self.bytes = 0
        self.hits = 0  # batches served entirely from the cache
        self.misses = 0

    @staticmethod
    def row_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None) -> list[tuple[bytes, int] | None]:
        """One (key, length) per row, or None for a row that is not right-padded."""
        keys: list[tuple[bytes, int] | None] = []
        for i in range(input_ids.shape[0]):
            length = int(attention_mask[i].sum()) if attention_mask is not None else input_ids.shape[1]
            if attention_mask is not None and not bool(attention_mask[i, :length].all()):
                keys.append(None)
                continue
            digest = hashlib.sha256(input_ids[i, :length].to(torch.int64).numpy().tobytes())
            if token_type_ids is not None:
                digest.update(token_type_ids[i, :length].to(torch.int64).numpy().tobytes())
            keys.append((digest.digest(), length))
        return keys

    def lookup(self, keys, seq_len: int, hidden_size: int) -> dict[int, torch.Tensor] | None:
        if any(k is None or k[0] not in self.entries for k in keys):
            return None
        replay = {}
        for layer in self.layers:
            first = self.entries[keys[0][0]][layer]
            padded = first.new_zeros(len(keys), seq_len, hidden_size)
            for row, (key, length) in enumerate(keys):
                padded[row, :length] = self.entries[key][layer]
            replay[layer] = padded
        return replay

    def admit(self, keys, hidden_size: int) -> list[tuple[int, bytes, int]]:
        """Rows of this batch to store, within the bound (4 bytes per value, an upper bound)."""
        admitted, planned, seen = [], 0, set()
        for row, key in enumerate(keys):
            if key is None or key[0] in self.entries or key[0] in seen:
                continue
            need = key[1] * hidden_size * 4 * len(self.layers)
            if self.bytes + planned + need > self.max_bytes:
                continue
            admitted.append((row, key[0], key[1]))
            planned += need
            seen.add(key[0])
        return admitted

    def store(self, admitted, layer: int, hidden: torch.Tensor) -> None:
        for row, key, length in admitted:
            value = hidden[row, :length].detach().clone()
            self.entries.setdefault(key, {})[layer] = value
            self.bytes += value.numel() * value.element_size()
