"""Pipeline: the one object that owns the encoder, the frozen LM and the prefix mapper.

Everything the app and the CLI do goes through it: captions, zero-shot labels, answers,
few-shot continuations, search indexes and heatmaps. A pipeline saves to and loads from a
folder (`config.json`, `mapper.safetensors`, `encoder/`, `lm/`), like a diffusers pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file

from .blip2 import save_blip2
from .calibration import (
    CALIBRATION_NAME,
    Calibration,
    WordReading,
)
from .chat import Conversation, conversation
from .config import CONFIG_NAME, MAPPER_WEIGHTS, Parts, PipelineConfig
from .device import PRECISIONS, autocast_to, decode_dtype, default_device
from .encoder import Encoder, ImageEncoder
from .errors import ConfigError, InputError
from .explain import GENERIC_REFERENCES, occlusion_map
from .familiarity import PROFILE_NAME, UNKNOWN, Familiarity, FamiliarityProfile
from .images import ImageInput, load_image
from .mapper import PrefixMapper
from .presets import models_for
from .pretrained import clipcap_parts, load_parts
from .prompts import TRACKS_PROMPT, VIDEO_PROMPT, frame_prompt, question_prompt
from .reading import WordReader, calibrates, finished, shifted_views
from .search import SearchIndex
from .sequences import Sequences
from .streaming import Generated, TextStream
from .tasks import UnsupportedTaskError, task_set
from .video import (
    ANSWER_TOKENS,
    DESCRIPTION_TOKENS,
    FRAME_LINE_TOKENS,
    TRACK_TOKENS,
    Video,
    VideoText,
    frames_video,
    read_video,
)
from .zeroshot import ClassWeights

# A part of an interleaved sequence: an image (its visual prefix goes there) or text.
Part = ImageInput | str
# `calibration=` of the tasks that report probabilities: the model's own calibration (or raw
# probabilities where it has none), None for the LM's raw ones, or a given `Calibration`
OWN = "own"


class Pipeline:
    """A CLIP-style encoder + a frozen causal LM + a learned visual prefix mapper."""

    def __init__(
        self,
        encoder: ImageEncoder,
        lm: torch.nn.Module,
        tokenizer,
        mapper: PrefixMapper | torch.nn.Module,
        config: PipelineConfig,
        device: torch.device | str | None = None,
        *,
        familiarity: FamiliarityProfile | None = None,
        calibration: Calibration | None = None,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        self.familiarity_profile = familiarity  # what its training images looked like
        self.calibration = calibration  # what turns its raw probabilities into calibrated ones
        if config.precision not in PRECISIONS:
            raise ConfigError(f"precision {config.precision!r}: choose one of {PRECISIONS}")
        self.encoder = encoder
        _place(self.encoder.model, self.device)
        self.lm = _place(lm, self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mapper = _place(mapper, self.device).eval()
        self.config = config
        self.tasks = task_set(config.tasks)
        # zero-shot: each label set's text embeddings, kept (requests may run in threads)
        self.label_weights = ClassWeights(self.encoder, self.device, config.template_pooling)
        self._stop_ids = [self.tokenizer.eos_token_id] + [
            ids[0] for s in config.stop if len(ids := self._token_ids(s)) == 1
        ]
        # how sure it is of a text, word by word (vlm.reading)
        self.reader = WordReader(self.tokenizer, self.encoder, self._stop_ids,
                                 self._continuation_logits, self._trim)  # fmt: skip

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device=None) -> Pipeline:
        """Load a preset name (see `vlm.presets`), a saved folder, a BLIP-2 folder or a hub
        repo id (see `vlm.pretrained`)."""
        return cls._from_parts(load_parts(name_or_path, device), device)

    @classmethod
    def from_clipcap(cls, checkpoint: str | os.PathLike, device=None, **kwargs) -> Pipeline:
        """Load a ClipCap checkpoint as published (see `vlm.clipcap.read_clipcap`)."""
        return cls._from_parts(clipcap_parts(checkpoint, **kwargs), device)

    @classmethod
    def _from_parts(cls, parts: Parts, device) -> Pipeline:
        *modules, familiarity, calibration = parts
        return cls(*modules, device=device, familiarity=familiarity, calibration=calibration)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None):
        """Write a folder that `from_pretrained` loads; `dtype` (e.g. fp16) shrinks the files."""
        if self.config.family == "blip2":  # the published layout, as transformers writes it
            return save_blip2(self, directory, dtype)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(
            self.config, lm="lm", mapper=self.mapper.config, tasks=sorted(self.tasks)
        )
        if self.encoder.is_local:
            self.encoder.save(directory / "encoder", dtype=dtype)
            config.encoder = {"model": "local-dir:encoder"}
        _save_lm(self.lm, directory / "lm", dtype)
        self.tokenizer.save_pretrained(directory / "lm")
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu()
                 for k, v in self.mapper.state_dict().items()}  # fmt: skip
        save_file(state, directory / MAPPER_WEIGHTS)
        (directory / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        for name, part in ((PROFILE_NAME, self.familiarity_profile),
                           (CALIBRATION_NAME, self.calibration)):  # fmt: skip
            (directory / name).unlink(missing_ok=True)
            if part is not None:
                part.save(directory)

    def push_to_hub(
        self,
        repo_id: str,
        folder: str | os.PathLike | None = None,
        private: bool = False,
        token: str | None = None,
    ) -> str:
        """Upload the pipeline (a folder saved before, or saved now) to a hub model repo;
        `from_pretrained(repo_id)` loads it back. Returns the repo's URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as scratch:
            if folder is None:
                folder = Path(scratch) / "pipeline"
                self.save_pretrained(folder)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                              commit_message="Upload vlm pipeline")  # fmt: skip
        return str(url)

    # ------------------------------------------------------------------ the visual prefix

    def _images(self, images: Sequence[ImageInput] | ImageInput) -> list[Image.Image]:
        if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
            images = [images]
        return [load_image(image) for image in images]

    @torch.inference_mode()
    def familiarity(self, images: Sequence[ImageInput] | ImageInput) -> list[Familiarity]:
        """For each image, how much it looks like the images this model was trained on (see
        `vlm.familiarity`): `score` in [0, 1] and `familiar`, or both None for a model that
        has no profile of its training images (say "unknown", never guess)."""
        images = self._images(images)
        if self.familiarity_profile is None:
            return [UNKNOWN] * len(images)
        return self._familiarity_of_pixels(self.encoder.pixels(images))

    @torch.inference_mode()
    def _familiarity_of_pixels(self, pixels: torch.Tensor) -> list[Familiarity]:
        """`familiarity` of images already preprocessed into pixels."""
        if self.familiarity_profile is None:
            return [UNKNOWN] * len(pixels)
        embeddings = self.encoder.encode_pixels(pixels.to(self.device))
        return self.familiarity_profile.familiarity(embeddings.cpu().numpy())

    @torch.inference_mode()
    def image_features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """What the mapper reads: the raw image embedding [B, D] (ClipCap), or image tokens
        [B, N, D] for a mapper with input="tokens"."""
        return self.features_from_pixels(self.encoder.pixels(self._images(images)))

    @torch.inference_mode()
    def features_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """`image_features` of images already preprocessed into pixels [B, 3, H, W]: what the
        mapper's `input` names ("embedding", "tokens", or the vision tower's "hidden_states"
        for BLIP-2's Q-Former), in the decode's precision."""
        mixed = self.decode_dtype is not None
        if self.mapper.input == "tokens":
            count = self.mapper.config["num_tokens"]
            grid = int(round((count - 1) ** 0.5))
            if grid < 1 or 1 + grid * grid != count:
                raise ConfigError(
                    f"the mapper reads {count} image tokens, but the encoder gives its pooled "
                    "embedding and a grid × grid of patch tokens: 1 + grid² (5, 17, 50, 65, …)"
                )
            return self.encoder.encode_tokens(pixels, grid=grid, mixed=mixed)
        if self.mapper.input == "hidden_states":
            return self.encoder.encode_hidden_states(pixels)
        return self.encoder.encode_pixels(pixels, mixed=mixed)

    @property
    def decode_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the caption/answer path: None (weights as loaded, the
        published precision) unless mixed precision was asked for (see `vlm.device`)."""
        return decode_dtype(self.device, self.config.precision)

    def _decode_autocast(self):
        return autocast_to(self.device, self.decode_dtype)

    def _require(self, task: str) -> None:
        """Refuse a task the model was not trained for, naming the models that were."""
        if task not in self.tasks:
            raise UnsupportedTaskError(task, self.config.name, models_for(task))

    @torch.inference_mode()
    def prefix(
        self, images: Sequence[ImageInput], prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Visual prefix embeddings [B, k, d_lm] for the images.

        `prompts`: the text that follows each prefix ("Caption:", "Question: … Answer:"),
        which a mapper that `reads_prompt` takes in (default: the caption prompt); other
        mappers ignore it."""
        return self._prefix_from_pixels(self.encoder.pixels(self._images(images)), prompts)

    @torch.inference_mode()
    def _prefix_from_pixels(self, pixels: torch.Tensor, prompts=None) -> torch.Tensor:
        """`prefix` of images already preprocessed into pixels."""
        features = self.features_from_pixels(pixels)
        with self._decode_autocast():
            if not getattr(self.mapper, "reads_prompt", False):
                return self.mapper(features).float()
            prompts = prompts or [self.config.caption_prompt] * len(features)
            if len(prompts) != len(features):
                raise InputError(f"{len(features)} images but {len(prompts)} prompts")
            return self.mapper(features, *self.prompt_states(prompts)).float()

    @torch.no_grad()
    def prompt_states(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen LM's last hidden states of each prompt on its own [B, T, d] (float,
        right-padded) and which are tokens [B, T]: what a mapper that `reads_prompt` takes in.
        Without autograd, not inference mode, so the prefix stage can train on them."""
        tokens, mask = self.sequences.prompt_tokens(prompts)
        out = self.lm(input_ids=tokens, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[-1].float(), mask

    # ------------------------------------------------------------------ text through the LM

    @property
    def sequences(self) -> Sequences:
        """How this pipeline's LM reads prefixes and text (`vlm.sequences`), shared with the
        trainer."""
        return Sequences(self.lm, self.tokenizer, self.config.bos_after_image)

    def _token_ids(self, text: str) -> list[int]:
        return self.sequences.token_ids(text)

    def embed(self, parts: Sequence[Part | torch.Tensor]) -> torch.Tensor:
        """One sequence of LM input embeddings [L, d] from images, prefixes [k, d] and text,
        in order (see `vlm.sequences.Sequences.embed`)."""
        return self.sequences.embed(parts, lambda image: self.prefix([image])[0])

    @property
    def max_positions(self) -> int:
        """How many positions the LM reads (the size of its position table; 2**30 if none)."""
        return self.sequences.max_positions

    def _room(self, length: int, need: int = 1) -> int:
        return self.sequences.room(length, need)

    def _trim(self, text: str) -> str:
        for stop in self.config.stop:  # keep the stop string itself, as ClipCap does
            if stop in text:
                text = text[: text.index(stop) + len(stop)]
        return text.strip()

    @torch.inference_mode()
    def _generate(self, sequences: list[torch.Tensor], **decoding) -> list[str]:
        """Continue each embedded sequence with the frozen LM's own `generate` (KV cache);
        `decoding` as `_generate_options` takes it."""
        return [self._text(ids) for ids in self._generate_ids(sequences, **decoding)]

    @torch.inference_mode()
    def _generate_ids(self, sequences: list[torch.Tensor], **decoding) -> list[list[int]]:
        """`_generate`'s new token ids for each sequence, up to and with its first stop token."""
        options = self._generate_options(sequences, **decoding)
        with self._decode_autocast():
            tokens = self.lm.generate(**options)
        rows = []
        for row in tokens.tolist():
            ends = [i for i, token in enumerate(row) if token in self._stop_ids]
            rows.append(row[: ends[0] + 1] if ends else row)
        return rows

    def _text(self, ids: list[int]) -> str:
        """The finished text of generated token ids: decoded, trimmed at a stop string."""
        return self._trim(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _generate_options(
        self,
        sequences: list[torch.Tensor],
        max_new_tokens: int = 30,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> dict:
        """`lm.generate`'s arguments, the same whether the text is streamed or not."""
        embeds, mask = self.sequences.left_pad(sequences)
        max_new_tokens = min(max_new_tokens, self._room(embeds.shape[1]))
        options = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else {}
        return dict(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            eos_token_id=self._stop_ids,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **options,
        )

    @torch.inference_mode()
    def _stream(self, sequence: torch.Tensor, confidence=None, **decoding) -> TextStream:
        """`_generate` on one sequence, as a `TextStream` of partial texts (it starts now);
        `confidence`: the stream's hook (see `_confidence`)."""
        options = self._generate_options([sequence], **decoding)
        return TextStream(self.lm, self.tokenizer, options, self._trim, self._decode_autocast,
                          confidence)  # fmt: skip

    @torch.inference_mode()
    def _continuation_logits(
        self, sequences: list[torch.Tensor], ids: list[list[int]]
    ) -> list[torch.Tensor]:
        """The LM's logits at each of `ids` after its sequence (`Sequences.continuation_logits`)."""
        return self.sequences.continuation_logits(sequences, ids, self._decode_autocast)

    @torch.inference_mode()
    def _score(self, sequences: list[torch.Tensor], continuations: list[str]) -> torch.Tensor:
        """Sum of the LM's log-probabilities of each continuation after its sequence."""
        return self.sequences.score(sequences, continuations, self._decode_autocast)

    # ------------------------------------------------------------------ how sure it is

    @property
    def can_check_words(self) -> bool:
        """Whether the encoder can judge a caption's words against the image (an open_clip
        model, text tower and all): a calibration's second expert (`vlm.calibration`)."""
        return isinstance(self.encoder, Encoder)

    def _calibration(self, calibration) -> Calibration | None:
        return self.calibration if calibration is OWN else calibration

    def _check_embeddings(self, pixels: torch.Tensor, calibration) -> torch.Tensor | None:
        """The normalised image embeddings the words' second expert reads, where it is used."""
        if calibration is None or not calibration.experts or not self.can_check_words:
            return None
        return self.encoder.encode_pixels(pixels, normalize=True)

    def read_text(
        self, images: Sequence[ImageInput], texts: Sequence[str], *, prompt: str | None = None,
        batch_size: int = 32,
    ) -> list[list[WordReading]]:  # fmt: skip
        """How the model reads each text after each image's prefix and `prompt` (default: the
        caption prompt), teacher-forced: each word's probability under the frozen LM and,
        where the encoder has a text tower, its alternatives (the LM's likeliest first tokens
        there) with how well the text with each in the word's place matches the image. What
        a calibration's word experts are fitted on (`vlm.calibration.fit_calibration`)."""
        prompt = self.config.caption_prompt if prompt is None else prompt
        images = self._images(images)
        if len(texts) != len(images):
            raise InputError(f"{len(images)} images but {len(texts)} texts")
        space = " " if prompt and not prompt[-1].isspace() else ""
        check = Calibration(experts=(1.0, 1.0)) if self.can_check_words else None
        readings = []
        for start in range(0, len(images), batch_size):
            pixels = self.encoder.pixels(images[start : start + batch_size])
            prefixes = self._prefix_from_pixels(pixels, [prompt] * len(pixels))
            sequences = [self.embed([p, prompt]) for p in prefixes]
            ids = [self._token_ids(space + t) for t in texts[start : start + batch_size]]
            rows = self.reader.read(
                sequences, ids, self._check_embeddings(pixels, check), str.strip
            )
            readings += [words for _, words, _ in rows]
        return readings

    # ------------------------------------------------------------------ tasks

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        *,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        return_words: bool = False,
        calibration: Calibration | None | str = OWN,
    ) -> list[str] | list[Generated]:
        """A caption for each image (greedy by default; beam search or nucleus sampling).

        `return_words=True`: a finished `Generated` for each, its words with how sure the
        model is of each (calibrated where the model is, see `vlm.calibration`; `calibration`
        None for the LM's raw probabilities) and the LM's own in `raw_words`."""
        self._require("caption")
        images = self._images(images)
        decoding = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=do_sample,
                        temperature=temperature, top_p=top_p)  # fmt: skip
        calibration = self._calibration(calibration)
        captions: list = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if not return_words:
                captions += self._caption_prefixes(self.prefix(chunk), batch_size, **decoding)
                continue
            pixels = self.encoder.pixels(chunk)
            sequences = [self.embed([p, self.config.caption_prompt])
                         for p in self._prefix_from_pixels(pixels)]  # fmt: skip
            ids = self._generate_ids(sequences, **decoding)
            embeddings = self._check_embeddings(pixels, calibration)
            rows = self.reader.read(sequences, ids, embeddings, self._trim)
            copies, copy_embeddings = self._shifted_copies(pixels, calibration)
            repeated = ids * (len(copies) // len(ids))  # every copy in one batch
            shifted = [words for _, words, _
                       in self.reader.read(copies, repeated, copy_embeddings, self._trim)
                       ] if copies else []  # fmt: skip
            captions += [finished(text, readings, tokens, calibration, "caption",
                                  shifted[row :: len(rows)])
                         for row, (text, readings, tokens) in enumerate(rows)]  # fmt: skip
        return captions

    @torch.inference_mode()
    def _shifted_copies(self, pixels: torch.Tensor, calibration: Calibration | None):
        """For a calibration that reads captions on shifted copies of their images (`views` >
        1, `vlm.reading.shifted_views`): the copies' caption sequences, copy by copy (each
        the batch in order), and the embeddings the encoder check reads of them (None
        without one); ([], None) otherwise. One pass of the encoder for every copy."""
        if not calibrates(calibration, "caption") or calibration.views <= 1:
            return [], None
        shifted = torch.cat(shifted_views(pixels, calibration.views))
        sequences = [self.embed([p, self.config.caption_prompt])
                     for p in self._prefix_from_pixels(shifted)]  # fmt: skip
        return sequences, self._check_embeddings(shifted, calibration)

    def _caption_prefixes(self, prefixes, batch_size: int = 16, **decoding) -> list[str]:
        """Captions of ready prefixes ([k, d] each), `batch_size` at a time."""
        captions: list[str] = []
        for start in range(0, len(prefixes), batch_size):
            chunk = prefixes[start : start + batch_size]
            sequences = [self.embed([p, self.config.caption_prompt]) for p in chunk]
            captions += self._generate(sequences, **decoding)
        return captions

    def stream_caption(self, image: ImageInput, **decoding) -> TextStream:
        """`caption` of one image, streamed: iterate for `Generated` snapshots (text so far,
        words with the LM's probability); the last has `done=True` and the same text as
        `caption([image], **decoding)[0]`. The image is encoded before this returns; the LM
        then runs in a background thread."""
        pixels = self.encoder.pixels(self._images(image))
        sequence = self.embed([self._prefix_from_pixels(pixels)[0],
                                      self.config.caption_prompt])  # fmt: skip
        calibration = self._calibration(OWN)

        def views():  # the shifted copies, encoded once the caption is written
            return self._shifted_copies(pixels, calibration)

        confidence = self.reader.confidence(
            sequence, self._check_embeddings(pixels, calibration), calibration, "caption", views
        )
        return self._stream(sequence, confidence=confidence, **decoding)

    def stream_answer(
        self, image: ImageInput, question: str, *, max_new_tokens: int = 10
    ) -> TextStream:
        """`answer` (open-ended) of one question about one image, streamed like
        `stream_caption`."""
        sequence = self._question_sequences(self._images(image), [question])[0]
        confidence = self.reader.confidence(sequence, None, self._calibration(OWN), "answer")
        return self._stream(sequence, max_new_tokens=max_new_tokens, confidence=confidence)

    def stream_continue(
        self, parts: Sequence[Part], *, max_new_tokens: int = 20, describe: bool = False,
        **decoding,
    ) -> TextStream:  # fmt: skip
        """`continue_sequence`, streamed like `stream_caption`."""
        self._require("few_shot")
        if not parts:
            raise InputError("nothing to continue: give at least one image or text")
        sequence = self._embed_sequences([parts], describe)[0]
        return self._stream(sequence, max_new_tokens=max_new_tokens, **decoding)

    def chat(self, messages: Sequence[dict], *, max_new_tokens: int = 20) -> str:
        """The reply to a conversation about images (see `vlm.chat`: OpenAI-style messages,
        images and text in any order, the oldest turns left out where the LM's positions
        run short); greedy."""
        return self.stream_chat(messages, max_new_tokens=max_new_tokens).final().text

    def stream_chat(
        self, messages: Sequence[dict] | Conversation, *, max_new_tokens: int = 20
    ) -> TextStream:
        """`chat`, streamed like `stream_answer` (its words calibrated as answers are). Give
        it the `vlm.chat.conversation(self, messages, max_new_tokens)` built before to know
        how many old turns were left out (its `dropped`)."""
        self._require("answer")
        talk = messages
        if not isinstance(talk, Conversation):
            talk = conversation(self, messages, max_new_tokens)
        sequence = self.embed(talk.parts)
        confidence = self.reader.confidence(sequence, None, self._calibration(OWN), "answer")
        return self._stream(sequence, max_new_tokens=max_new_tokens, confidence=confidence)

    def _question_sequences(self, images, questions) -> list[torch.Tensor]:
        images = self._images(images)
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if len(questions) != len(images):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        prompts = [question_prompt(q.strip(), self.config.question_template) for q in questions]
        for prompt in prompts:  # before any image is encoded or prompt read
            self._room(self.mapper.prefix_length + len(self._token_ids(prompt)))
        prefixes = self.prefix(images, prompts)
        return [self.embed([p, q]) for p, q in zip(prefixes, prompts, strict=True)]

    def answer(
        self,
        images: Sequence[ImageInput] | ImageInput,
        questions: Sequence[str] | str,
        choices: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 10,
        return_scores: bool = False,
        return_words: bool = False,
        calibration: Calibration | None | str = OWN,
    ):
        """Answer a question about each image, Frozen-style (prefix + "Question: … Answer:").

        With `choices`, picks the choice the LM finds most likely after the prefix and the
        question; `return_scores=True` then gives (answer, {choice: probability}) pairs, the
        probabilities calibrated where the model is (`calibration` None: the LM's). Without
        choices, `return_words=True` gives a finished `Generated` for each answer, as
        `caption` does."""
        self._require("answer")
        calibration = self._calibration(calibration)
        sequences = self._question_sequences(images, questions)
        if not choices:
            if return_words:
                ids = self._generate_ids(sequences, max_new_tokens=max_new_tokens)
                return [finished(text, readings, tokens, calibration, "answer")
                        for text, readings, tokens
                        in self.reader.read(sequences, ids, None, self._trim)]  # fmt: skip
            answers = self._generate(sequences, max_new_tokens=max_new_tokens)
            return [(a, {}) for a in answers] if return_scores else answers
        choices = list(dict.fromkeys(c.strip() for c in choices if c.strip()))
        results = []
        for sequence in sequences:
            scores = self._score([sequence] * len(choices), [" " + c for c in choices])
            probs = dict(zip(choices, scores.softmax(-1).tolist(), strict=True))
            best = choices[int(scores.argmax())]
            results.append((best, calibration.choices(probs) if calibration else probs))
        return results if return_scores else [best for best, _ in results]

    def continue_sequence(self, parts: Sequence[Part], *, max_new_tokens: int = 20, **kw) -> str:
        """Few-shot, Frozen-style: interleaved images and text, continued by the frozen LM.

        e.g. [img1, "Colour: red\\n", img2, "Colour: blue\\n", query_image, "Colour:"].
        `describe=True` first writes each image's caption after it, as far as the LM's
        positions leave room (`describe_images`)."""
        return self.continue_sequences([parts], max_new_tokens=max_new_tokens, **kw)[0]

    def continue_sequences(
        self, sequences: Sequence[Sequence[Part]], *, max_new_tokens: int = 20,
        describe: bool = False, **kw,
    ) -> list[str]:  # fmt: skip
        """`continue_sequence` for several interleaved sequences at once (one batch)."""
        self._require("few_shot")
        if not sequences or not all(sequences):
            raise InputError("nothing to continue: give at least one image or text")
        embedded = self._embed_sequences(sequences, describe)
        return self._generate(embedded, max_new_tokens=max_new_tokens, **kw)

    def describe_images(
        self, sequences: Sequence[Sequence[Part | torch.Tensor]], *, fit: bool = False
    ) -> list[list[str | torch.Tensor]]:
        """The sequences with each image as its prefix (encoded together) and each
        prefix followed by its caption line: the caption prompt, the model's greedy caption, a
        newline. An image whose text already starts with the caption prompt is not described
        again. With `fit`, caption lines are written from the last image back only while the
        LM's positions leave room for them and a word more (the query's first).

        A small LM that read k-shot lists only after scene descriptions reads the examples'
        values off the words; the prefixes stay in front of them (docs/shapeworld.md
        measures both ways)."""
        self._require("caption")
        sequences = self._with_prefixes(sequences)
        prompt = (self.config.caption_prompt + " ").lstrip()
        marker = prompt.strip()
        wanted = []  # per sequence: its prefixes to caption (not those the user captioned)
        for parts in sequences:
            following = [*parts[1:], ""]
            wanted.append([
                i for i, (part, after) in enumerate(zip(parts, following, strict=True))
                if not isinstance(part, str)
                and not (marker and isinstance(after, str) and after.lstrip().startswith(marker))
            ])  # fmt: skip
        captions = iter(self._caption_prefixes(
            [parts[i] for parts, indices in zip(sequences, wanted, strict=True) for i in indices]
        ))  # fmt: skip
        described = []
        for parts, indices in zip(sequences, wanted, strict=True):
            lines = {i: f"{prompt}{next(captions)}\n" for i in indices}
            if fit:
                room = self.max_positions - 1 - len(self.embed(parts))
                for i in sorted(lines, reverse=True):
                    room -= len(self._token_ids(lines[i]))
                    if room < 0:  # this line and every earlier one are left out
                        lines = {j: line for j, line in lines.items() if j > i}
                        break
            pieces: list[str | torch.Tensor] = []
            for i, part in enumerate(parts):
                pieces += [part, lines[i]] if i in lines else [part]
            described.append(pieces)
        return described

    def _with_prefixes(self, sequences) -> list[list[str | torch.Tensor]]:
        """The sequences with every image replaced by its prefix, all encoded together."""
        images = [part for parts in sequences for part in parts if _is_image(part)]
        prefixes = iter(self.prefix(images) if images else [])
        return [[next(prefixes) if _is_image(p) else p for p in parts] for parts in sequences]

    def _embed_sequences(self, sequences, describe: bool) -> list[torch.Tensor]:
        """`embed` of each interleaved sequence, with `describe` described first as far
        as the LM's positions leave room."""
        if describe:
            sequences = self.describe_images(sequences, fit=True)
        return [self.embed(parts) for parts in sequences]

    # ------------------------------------------------------------------ video

    def read_video(self, video, *, fps: float = 1.0, max_frames: int = 16,
                   frame_rate: float | None = None) -> Video:  # fmt: skip
        """A video's frames sampled `fps` a second (at most `max_frames`, spread evenly over a
        longer clip; see `vlm.video`): `video` is a file (path or bytes) or a list of frames,
        `frame_rate` of them a second (default: `fps`, each frame one sample)."""
        if isinstance(video, Video):  # sampled already (a server decodes within its limits)
            return video
        if isinstance(video, (str, os.PathLike, bytes)):
            return read_video(video, fps=fps, max_frames=max_frames)
        frames = self._images(list(video))
        return frames_video(frames, frame_rate or fps, sample_fps=fps, max_frames=max_frames)

    def video_sequence(
        self, times: Sequence[float], prefixes: Sequence[torch.Tensor] | None, prompt: str,
        need: int, lines: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
        """The embedded sequence of a video's frames (their `prefixes`, at `times` seconds),
        SmolVLM2's layout: each frame's prefix after its timestamp ("Frame at 0:03:"), a
        line each, then `prompt`; where the LM's positions leave fewer than `need` tokens
        after it, frames are left out evenly (the first and the last kept; one frame needs
        room for 8 tokens only). (sequence, the times of the frames in it). What the prefix
        stage trains clips on, too. With `lines` (each frame's line, `frame_lines`), each
        frame is its line as text after its timestamp instead, as in the LM's narratives."""
        count = len(times)
        while True:
            keep = _evenly(len(times), count)
            if lines is not None:  # one text, tokenized as the LM read its narratives
                text = "\n".join(f"{frame_prompt(times[i])} {lines[i]}" for i in keep)
                sequence = self.embed([f"{text}\n{prompt}"])
            else:
                parts: list = []
                for i in keep:
                    parts += [("\n" if parts else "") + frame_prompt(times[i]), prefixes[i]]
                sequence = self.embed([*parts, "\n" + prompt])
            if len(sequence) + need <= self.max_positions or count == 1:
                self._room(len(sequence), need if count > 1 else min(need, 8))
                return sequence, [times[i] for i in keep]
            count -= 1

    @torch.inference_mode()
    def frame_lines(self, frames: Sequence[ImageInput], times: Sequence[float]) -> list[str]:
        """Each video frame's line, greedy: what the model writes after the frame's prefix
        and its timestamp ("Frame at 0:02:"): its objects and where they are, for a model
        trained to (`PipelineConfig.video_frame_lines`)."""
        return self._frame_lines(self.encoder.pixels(self._images(frames)), times)

    def _frame_lines(self, pixels: torch.Tensor, times: Sequence[float]) -> list[str]:
        prompts = [frame_prompt(t) for t in times]
        prefixes = self._prefix_from_pixels(pixels, prompts)
        sequences = [self.embed([p, prompt]) for p, prompt in zip(prefixes, prompts, strict=True)]
        return self._generate(sequences, max_new_tokens=FRAME_LINE_TOKENS)

    def _video_inputs(self, video: Video) -> tuple[torch.Tensor, list | None, list | None]:
        """(pixels, prefixes, lines) of a video's sampled frames: each frame's line where the
        model reads videos as frame lines, else each frame's prefix (made as for a caption)."""
        pixels = self.encoder.pixels(video.frames)  # each frame encoded once for all
        if self.config.video_frame_lines:
            return pixels, None, self._frame_lines(pixels, video.times)
        return pixels, list(self._prefix_from_pixels(pixels)), None

    def _video_text(self, video, question, fps, max_frames, frame_rate, max_new_tokens,
                    timeline: bool) -> VideoText:  # fmt: skip
        sampled = self.read_video(video, fps=fps, max_frames=max_frames, frame_rate=frame_rate)
        pixels, prefixes, lines = self._video_inputs(sampled)
        stream, times, before = self._video_stream(sampled, prefixes, question, max_new_tokens,
                                                   lines)  # fmt: skip
        final = stream.final()
        probability = before * math.prod(p for _, p in final.tokens)
        calibration = self._calibration(OWN)
        platt = calibration and (calibration.descriptions if question is None
                                 else calibration.video_answers)  # fmt: skip
        # the frames' prefixes are those `caption` builds (after the caption prompt)
        captions = lines or []
        if timeline and not lines and "caption" in self.tasks:
            captions = self._caption_prefixes(prefixes)
        return VideoText(final.text, times, list(zip(sampled.times, captions, strict=False)),
                         list(zip(sampled.times, self._familiarity_of_pixels(pixels),
                                  strict=True)), guess="video" not in self.tasks,
                         probability=probability,
                         confidence=platt(probability) if platt else None)  # fmt: skip

    def _video_stream(self, video: Video, prefixes: list | None, question: str | None,
                      max_new_tokens: int, lines: list | None = None):  # fmt: skip
        """(the stream of the task's text, the times of the frames read, the LM's probability
        of what it wrote before that text: its tracks and description, from frame lines)."""
        if question is None:
            self._require("caption")
            prompt = VIDEO_PROMPT
        else:
            self._require("answer")
            prompt = question_prompt(question.strip(), self.config.question_template)
        times, before = video.times, 1.0
        if lines is not None:  # the LM's own steps first, as in its narratives
            times, lines, read, before = self._read_lines(times, lines, question is not None,
                                                          max_new_tokens)  # fmt: skip
            prompt = f"{read}\n{prompt}"
        sequence, times = self.video_sequence(times, prefixes, prompt, max_new_tokens, lines)
        confidence = None
        if question is not None:
            confidence = self.reader.confidence(sequence, None, self._calibration(OWN), "answer")
        stream = self._stream(sequence, max_new_tokens=max_new_tokens, confidence=confidence)
        return stream, times, before

    def _written(self, sequence: torch.Tensor, max_new_tokens: int) -> tuple[str, float]:
        """What the LM writes after `sequence` (greedy) and its probability."""
        final = self._stream(sequence, max_new_tokens=max_new_tokens).final()
        return final.text, math.prod(p for _, p in final.tokens)

    def _read_lines(self, times: Sequence[float], lines: Sequence[str], asking: bool,
                    max_new_tokens: int) -> tuple[list[float], list[str], str, float]:  # fmt: skip
        """What the LM writes from frame lines before the task's text, as in its narratives:
        each object's track ("Tracks: …"), and before a question, what happened too. The
        frames are those that leave room for all of it (`video_sequence`: left out evenly).
        (the frames' times, their lines, the text written, its probability)."""
        # the prompts' own tokens too ("What happened:", the question's cue)
        need = TRACK_TOKENS + DESCRIPTION_TOKENS + (max_new_tokens if asking else 0) + 8
        _, kept = self.video_sequence(times, None, TRACKS_PROMPT, need, lines)
        lines = [lines[list(times).index(t)] for t in kept]
        sequence, _ = self.video_sequence(kept, None, TRACKS_PROMPT, TRACK_TOKENS, lines)
        tracks, probability = self._written(sequence, TRACK_TOKENS)
        read = f"{TRACKS_PROMPT} {tracks}"
        if asking:
            sequence, _ = self.video_sequence(kept, None, f"{read}\n{VIDEO_PROMPT}",
                                              DESCRIPTION_TOKENS, lines)  # fmt: skip
            happened, sure = self._written(sequence, DESCRIPTION_TOKENS)
            read, probability = f"{read}\n{VIDEO_PROMPT} {happened}", probability * sure
        return kept, lines, read, probability

    def describe_video(self, video, *, fps: float = 1.0, max_frames: int = 16,
                       frame_rate: float | None = None,
                       max_new_tokens: int = DESCRIPTION_TOKENS,
                       timeline: bool = True) -> VideoText:  # fmt: skip
        """What happens in a video (a file, or frames `frame_rate` a second), greedy: its
        frames sampled by time (`read_video`), each frame's prefix after its timestamp, then
        "What happened:"; with `timeline`, each sampled frame's own caption too."""
        return self._video_text(video, None, fps, max_frames, frame_rate, max_new_tokens,
                                timeline)  # fmt: skip

    def answer_video(self, video, question: str, *, fps: float = 1.0, max_frames: int = 16,
                     frame_rate: float | None = None, max_new_tokens: int = ANSWER_TOKENS,
                     timeline: bool = False) -> VideoText:  # fmt: skip
        """The answer to a question about a video, its frames laid out as `describe_video`
        lays them, then the question in the model's template."""
        return self._video_text(video, question, fps, max_frames, frame_rate, max_new_tokens,
                                timeline)  # fmt: skip

    def stream_video(self, video, question: str | None = None, *, fps: float = 1.0,
                     max_frames: int = 16, frame_rate: float | None = None,
                     max_new_tokens: int = DESCRIPTION_TOKENS,
                     ) -> tuple[TextStream, list[float]]:  # fmt: skip
        """`describe_video` (or, with a `question`, `answer_video`) streamed like
        `stream_caption`, and the times of the frames it reads."""
        sampled = self.read_video(video, fps=fps, max_frames=max_frames, frame_rate=frame_rate)
        _, prefixes, lines = self._video_inputs(sampled)
        stream, times, _ = self._video_stream(sampled, prefixes, question, max_new_tokens, lines)
        return stream, times

    def templates(self) -> list[str]:
        """Zero-shot prompt templates ("{}" marks the label): the preset's own, else OpenAI's
        80 ImageNet templates (open_clip keeps those as functions; called with "{}" they give
        the same text as format strings)."""
        templates = self.config.templates or open_clip.OPENAI_IMAGENET_TEMPLATES
        return [t("{}") if callable(t) else t for t in templates]

    def class_weights(self, labels: Sequence[str], templates: Sequence | None = None):
        """Normalised class text embeddings of `labels` in `templates` (default: the
        model's), kept for the label sets used most recently (see `vlm.zeroshot`)."""
        return self.label_weights(labels, templates or self.templates())

    def classify(
        self,
        images: Sequence[ImageInput] | ImageInput,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
    ) -> list[dict[str, float]]:
        """CLIP zero-shot: for each image, {label: probability} over the labels, best first."""
        self._require("classify")
        labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
        if not labels:
            raise InputError("give at least one label")
        weights = self.class_weights(labels, templates)
        features = self.encoder.encode_images(self._images(images), normalize=True)
        probs = (self.encoder.logit_scale * features @ weights).softmax(-1).cpu()
        if probs.shape[1] != len(labels):  # "sum": each template is a sub-class of its label
            probs = probs.view(len(probs), len(labels), -1).sum(-1)
        order, values = probs.argsort(dim=1, descending=True).tolist(), probs.tolist()
        return [{labels[j]: row[j] for j in best} for best, row in zip(order, values, strict=True)]

    def build_index(self, images_or_paths, batch_size: int = 32, **kwargs):
        """A text/image search index over images or image files (see `vlm.search`)."""
        self._require("search")
        index = SearchIndex(self.encoder, **kwargs)
        index.add(images_or_paths, batch_size=batch_size)
        return index

    def explain(self, image: ImageInput, text: str, *, keep: bool = True):
        """Where in the image `text` matches: a [grid, grid] map of each window alone,
        contrasted with the model's first label set (see `vlm.explain`); higher means more of
        `text` is there. `keep=False`: the map of each window covered, shown before."""
        self._require("explain")
        sets = list(self.config.label_sets.values())
        references = sets[0] if sets else GENERIC_REFERENCES
        return occlusion_map(self.encoder, self._images(image)[0], text, references, keep=keep)


def _evenly(total: int, count: int) -> list[int]:
    """`count` of `total` indices spread evenly, the first and the last among them."""
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _is_image(part) -> bool:
    """An image part of an interleaved sequence (not text, not a ready prefix tensor)."""
    return not isinstance(part, str | torch.Tensor)


def _place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move `module` to `device`, unless accelerate already placed it (a `device_map` that
    spreads a big model over GPU and CPU): its hooks move the tensors then."""
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        return module
    return module.to(device)


def _save_lm(lm, directory: Path, dtype: torch.dtype | None) -> None:
    """save_pretrained, optionally in a smaller dtype, without touching the live model."""
    state = None
    if dtype is not None:  # one cast per tensor, so tied weights (wte, lm_head) stay shared
        cast: dict[int, torch.Tensor] = {}
        state = {k: cast.setdefault(v.data_ptr(), v.detach().to(dtype))
                 for k, v in lm.state_dict().items()}  # fmt: skip
    lm.save_pretrained(directory, state_dict=state)
    if dtype is not None:  # the config says the weights' dtype, not the live model's
        config = type(lm.config).from_pretrained(directory)
        config.dtype = dtype
        config.save_pretrained(directory)
