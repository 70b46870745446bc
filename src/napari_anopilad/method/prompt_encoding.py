"""Text embeddings of keyword prompts, batched, with Compel's weighting and without its string parser.

Compel reads each prompt string with a pyparsing grammar, then runs the text encoder once for the prompt and
once more for each fragment weighted below 1. Parsing costs about a tenth of a second a prompt on the CPU,
more than the text encoder itself, and the encoder calls have batch size 1. Keyword prompts have a fixed
structure, so :class:`KeywordPromptEncoder` builds the fragments a parse would give from the keywords and their
marks, parsing each weighted keyword once. A keyword that Compel reads differently next to its neighbours
sends its prompts through a parse of the whole string. The encoder runs every pass of a batch in one text
encoder call and keeps the embeddings of recent prompts.

The arithmetic is Compel's (version 2, its defaults: truncation to 77 tokens, down-weighting by masking the
fragment):

- a token's embedding with weight ``w != 1`` is ``empty + (z - empty) * w``, where ``empty`` is the encoding of
  the empty token sequence;
- for each fragment with ``w < 1`` a second pass masks the fragment's tokens out of attention, and the passes
  are averaged with weights ``1`` and ``tan((1 - w) * pi / 2)`` (normalised to sum to 1).

The tests compare fragments with Compel's parser and embeddings with ``Compel.__call__``.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from napari_anopilad.method.prompts import (
    DOWNWEIGHT_STEP,
    KEYWORD_SEPARATOR,
    PROMPT_PREFIX,
    UPWEIGHT_STEP,
    KeywordPrompt,
    format_keyword,
    keyword_marks,
)

Fragment = tuple[str, float]

# Compel clamps a fragment weight at this value before taking the tangent, so a weight of 0 stays finite.
MIN_DOWNWEIGHT = 1e-5
# Words of letters and digits joined by single spaces or hyphens, which Compel's grammar reads as text.
PLAIN_TEXT = re.compile(r"[A-Za-z0-9]+(?:[ -][A-Za-z0-9]+)*")
# Parsed texts kept: keyword groups, and whole prompts whose groups Compel reads differently in context.
MAX_PARSED_TEXTS = 20_000


def fuse_fragments(fragments: Sequence[Fragment]) -> tuple[Fragment, ...]:
    """Join neighbouring fragments of equal weight with a space, as Compel's parser does."""
    fused: list[Fragment] = []
    for text, weight in fragments:
        if fused and fused[-1][1] == weight:
            fused[-1] = (fused[-1][0] + " " + text, weight)
        else:
            fused.append((text, weight))
    return tuple(fused)


@dataclass(frozen=True)
class EncodedTokens:
    """One prompt's token ids, per-token weights and the token ranges to mask for its down-weighted fragments.

    ``token_ids`` and ``token_weights`` have the text encoder's length (77): begin marker, at most 75 prompt
    tokens, end marker, padding. ``masked_ranges`` contains ``(first, last, weight)`` with inclusive token indices.
    """

    token_ids: tuple[int, ...]
    token_weights: tuple[float, ...]
    masked_ranges: tuple[tuple[int, int, float], ...]


class KeywordPromptEncoder:
    """Encode keyword prompts with Stable Diffusion's CLIP text encoder, weighted as Compel weights them.

    Parameters
    ----------
    tokenizer, text_encoder
        The pipeline's CLIP tokenizer (``model_max_length`` 77) and text encoder.
    style
        The prompt style of the keyword prompts (``"marks"`` or ``"numeric"``), which sets each keyword's weight.
    cache_size
        How many prompts' embeddings to keep (each is 77 x width floats on the text encoder's device; 236 kB at
        SD1.5's width 768). Neighbouring patches often share their keywords and marks.
    batch_size
        Maximum number of token sequences in one text encoder call.
    """

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModel,
        style: str = "marks",
        cache_size: int = 256,
        batch_size: int = 256,
    ) -> None:
        if tokenizer.model_max_length != 77:
            raise ValueError(
                f"the tokenizer's model_max_length is {tokenizer.model_max_length}; "
                "Stable Diffusion 1.5's text encoder needs 77"
            )
        if style not in ("marks", "numeric"):
            raise ValueError(f"prompt style {style!r} is invalid: use 'marks' or 'numeric'")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.style = style
        self.cache_size = cache_size
        self.batch_size = batch_size
        self.length = tokenizer.model_max_length
        self._parsed_texts: dict[str, tuple[Fragment, ...]] = {}
        self._group_reads_alone: dict[str, bool] = {}
        self._fragment_tokens: dict[str, tuple[int, ...]] = {}
        self._embeddings: OrderedDict[tuple[Fragment, ...], torch.Tensor] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        self.empty_z = self._encode_empty()

    # Fragments -----------------------------------------------------------------------------------------------

    def fragments(self, prompt: KeywordPrompt) -> tuple[Fragment, ...]:
        """Return the weighted fragments Compel's parser gives for the prompt's string."""
        top_k = len(prompt.keywords)
        ranked = list(enumerate(zip(prompt.keywords, prompt.weights, strict=True)))
        groups = [
            format_keyword(keyword, weight, rank, top_k, self.style) for rank, (keyword, weight) in ranked
        ]
        pieces: list[Fragment] = [(PROMPT_PREFIX.strip(), 1.0)]
        for (rank, (keyword, weight)), group in zip(ranked, groups, strict=True):
            if rank > 0:
                pieces.append((KEYWORD_SEPARATOR.strip(), 1.0))
            plain_weight = self._plain_weight(keyword, weight, rank, top_k)
            if plain_weight is not None:
                pieces.append((keyword, plain_weight))
            elif self._reads_alone(group):
                pieces.extend(self._parsed(group))
            else:
                # Compel reads this group differently next to its neighbours: parse the whole prompt.
                return self._parsed(PROMPT_PREFIX + KEYWORD_SEPARATOR.join(groups))
        return fuse_fragments(pieces)

    def _plain_weight(self, keyword: str, weight: float, rank: int, top_k: int) -> float | None:
        """Return the weight Compel reads for a keyword of plain words, or None for any other keyword.

        Plain words (letters and digits, joined by single spaces or hyphens) are text to Compel's grammar,
        so their group needs no parse: ``n`` marks weigh ``1.1 ** n`` or ``0.9 ** n``, as Compel computes
        them, and a number is read as written. Parsing every group took about 0.04 s on the CPU.
        """
        if PLAIN_TEXT.fullmatch(keyword) is None:
            return None
        if self.style == "numeric":
            number = f"{weight:.2f}"
            # A negative number reads as a "-" mark followed by text, so it goes through the parser.
            return None if number.startswith("-") else float(number)
        marks = keyword_marks(weight, rank, top_k)
        if marks.startswith("+"):
            return math.pow(UPWEIGHT_STEP, len(marks))
        if marks.startswith("-"):
            return math.pow(DOWNWEIGHT_STEP, len(marks))
        return 1.0

    def _reads_alone(self, group: str) -> bool:
        """Return whether Compel reads ``group`` inside a prompt as it reads the group alone.

        The check parses the prefix and the group twice, joined by the separator, once per group. Most
        groups pass. Compel keeps some, such as ``(cells -)++``, as literal text, which then fuses with the
        words around it.
        """
        if group not in self._group_reads_alone:
            alone = list(self._parsed(group))
            expected = fuse_fragments(
                [*self._parsed(PROMPT_PREFIX.strip()), *alone, (KEYWORD_SEPARATOR.strip(), 1.0), *alone]
            )
            probe = PROMPT_PREFIX + group + KEYWORD_SEPARATOR + group
            self._group_reads_alone[group] = self._parsed(probe, remember=False) == expected
        return self._group_reads_alone[group]

    def _parsed(self, text: str, remember: bool = True) -> tuple[Fragment, ...]:
        """Parse text in Compel syntax with Compel's own parser into weighted fragments, once per text.

        Compel's grammar changes some keywords: it spaces out punctuation, drops quotes and reads a
        trailing ``-`` as a mark. Parsing with Compel keeps all of that as Compel has it.
        """
        fragments = self._parsed_texts.get(text)
        if fragments is None:
            from compel.prompt_parser import PromptParser

            conjunction = PromptParser().parse_conjunction(text)
            fragments = ()
            if conjunction.prompts:
                (flattened,) = conjunction.prompts
                fragments = tuple((child.text, float(child.weight)) for child in flattened.children)
            if remember:
                if len(self._parsed_texts) >= MAX_PARSED_TEXTS:
                    self._parsed_texts.clear()
                self._parsed_texts[text] = fragments
        return fragments

    # Tokens --------------------------------------------------------------------------------------------------

    def _tokens(self, text: str) -> tuple[int, ...]:
        """Token ids of one fragment without begin and end markers (Compel tokenizes fragments one by one)."""
        if text not in self._fragment_tokens:
            ids = list(self.tokenizer(text, truncation=True, padding="do_not_pad").input_ids)
            if ids and ids[0] == self.tokenizer.bos_token_id:
                ids = ids[1:]
            if ids and ids[-1] == self.tokenizer.eos_token_id:
                ids = ids[:-1]
            self._fragment_tokens[text] = tuple(ids)
        return self._fragment_tokens[text]

    def encoded_tokens(self, fragments: Sequence[Fragment]) -> EncodedTokens:
        """Tokenize the fragments into one truncated, padded sequence with per-token weights and mask ranges.

        Truncation keeps the first 75 prompt tokens. Like Compel, a fragment that starts at or after the last
        position (76) is dropped from down-weighting, and one cut by truncation is masked up to and including
        position 76, the end marker.
        """
        if not fragments:
            fragments = (("", 1.0),)
        content = self.length - 2
        ids: list[int] = []
        weights: list[float] = []
        ranges: list[tuple[int, int, float]] = []
        last_position = self.length - 1
        for text, weight in fragments:
            tokens = self._tokens(text)
            if not tokens:
                continue
            first = 1 + len(ids)
            if weight < 1 and first < last_position:
                ranges.append((first, min(first + len(tokens) - 1, last_position), weight))
            ids.extend(tokens)
            weights.extend([float(weight)] * len(tokens))
        ids, weights = ids[:content], weights[:content]
        padding = content - len(ids)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        return EncodedTokens(
            token_ids=(bos, *ids, eos, *([pad] * padding)),
            token_weights=(1.0, *weights, 1.0, *([1.0] * padding)),
            masked_ranges=tuple(ranges),
        )

    # Embeddings ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @torch.no_grad()
    def _encode_empty(self) -> torch.Tensor:
        """Encode the empty sequence (begin, end, padding) without an attention mask, Compel's reference for weights."""
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        ids = [bos, eos] + [self.tokenizer.pad_token_id] * (self.length - 2)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.text_encoder(tokens, return_dict=True).last_hidden_state

    @torch.no_grad()
    def encode(self, prompts: Sequence[KeywordPrompt]) -> torch.Tensor:
        """Return the embeddings ``(len(prompts), 77, width)`` of the prompts, in the text encoder's dtype."""
        keys = [self.fragments(prompt) for prompt in prompts]
        missing = list(dict.fromkeys(key for key in keys if key not in self._embeddings))
        self.cache_misses += len(missing)
        self.cache_hits += len(keys) - len(missing)
        computed = self.encode_fragments(missing) if missing else None
        fresh = {key: computed[index] for index, key in enumerate(missing)} if computed is not None else {}
        rows = [fresh[key] if key in fresh else self._embeddings[key] for key in keys]
        for key in keys:
            if key in fresh:
                self._remember(key, fresh[key])
            else:
                self._embeddings.move_to_end(key)
        if not rows:
            return self.empty_z[:0]
        return torch.stack(rows)

    def _remember(self, key: tuple[Fragment, ...], embedding: torch.Tensor) -> None:
        if self.cache_size <= 0:
            return
        self._embeddings[key] = embedding
        self._embeddings.move_to_end(key)
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)

    @torch.no_grad()
    def encode_fragments(self, fragment_lists: Sequence[Sequence[Fragment]]) -> torch.Tensor:
        """Encode weighted fragment lists, with every text encoder pass of the batch in as few calls as possible.

        Returns ``(len(fragment_lists), 77, width)`` in the text encoder's dtype.
        """
        encoded = [self.encoded_tokens(fragments) for fragments in fragment_lists]

        # One row for the prompt, one more for each down-weighted fragment, with that fragment masked out.
        row_ids: list[tuple[int, ...]] = []
        row_masks: list[list[int]] = []
        row_weights: list[tuple[float, ...]] = []
        for tokens in encoded:
            row_ids.append(tokens.token_ids)
            row_masks.append([1] * self.length)
            row_weights.append(tokens.token_weights)
            for first, last, _ in tokens.masked_ranges:
                mask = [1] * self.length
                mask[first : last + 1] = [0] * (last + 1 - first)
                row_ids.append(tokens.token_ids)
                row_masks.append(mask)
                row_weights.append(tokens.token_weights)

        ids = torch.tensor(row_ids, dtype=torch.long, device=self.device)
        masks = torch.tensor(row_masks, dtype=torch.long, device=self.device)
        z = torch.cat(
            [
                self.text_encoder(
                    ids[start : start + self.batch_size],
                    masks[start : start + self.batch_size],
                    return_dict=True,
                ).last_hidden_state
                for start in range(0, len(row_ids), self.batch_size)
            ]
        )

        # Per-token weights scale each token's offset from the empty sequence; weight-1 tokens stay as encoded.
        token_weights = torch.tensor(row_weights, dtype=torch.float32, device=self.device)[..., None]
        token_weights = token_weights.expand(z.shape)
        empty = self.empty_z.to(z.device)
        z = torch.where(token_weights == 1, z, empty + (z - empty) * token_weights)

        # Average each prompt's passes: the unmasked one with weight 1, a masked one with tan((1 - w) pi / 2).
        embeddings = []
        row = 0
        for tokens in encoded:
            passes = 1 + len(tokens.masked_ranges)
            pass_weights = [1.0] + [
                math.tan((1.0 - max(MIN_DOWNWEIGHT, weight)) * math.pi / 2)
                for _, _, weight in tokens.masked_ranges
            ]
            blend = torch.tensor(pass_weights, dtype=z.dtype, device=z.device)
            blend = blend / torch.sum(blend)
            embeddings.append(torch.sum(z[row : row + passes] * blend[:, None, None], dim=0))
            row += passes
        return torch.stack(embeddings).to(self.text_encoder.dtype)
