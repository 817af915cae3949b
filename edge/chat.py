"""One conversation on the edge: the runtime (text <-> vectors), the remote stepper (the cloud session,
edge.remote) and the sentence loop (edge.loop), composed; nothing else.

A turn is `answer`: the answer's options go to the cloud with the prompt (`RemoteStepper.begin_turn`),
then the sentence loop runs over the stepper: at most `max_sentences` sentences, never more than the
context holds (the session's room minus what it already holds, prompt included), and the last
generated sentence is appended too, so the next turn (or a rebuild) sees the whole conversation.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

from sllm.edge.failures import EdgeError, TurnError  # noqa: F401 (sllm.edge.chat.EdgeError: the edge's errors)
from sllm.edge.loop import SentenceEvent, TurnEnd, sentence_loop
from sllm.edge.remote import RemoteStepper
from sllm.edge.runtime import EdgeRuntime, PromptError
from sllm.sentences.sampling import AnswerOptions, with_bundle_stop


def answer(runtime: EdgeRuntime, stepper: RemoteStepper, prompt: list[list[int]], options: AnswerOptions, *,
           room: int, **loop_options) -> Iterator[SentenceEvent | TurnEnd]:
    """edge-chat's answer to `prompt` (token ids of its sentences) through `stepper`, decoded and ended as
    `options` say (the stop rule resolved against the bundle's: `with_bundle_stop`): the options go to the
    cloud now, with the prompt's Append (it also drops whatever the cloud guessed past the conversation),
    then the sentence loop (`loop_options`: sentence_loop's; `room`: sentences the context can take after
    the prompt). Shared by ChatSession.turn and bench.rtt --chat."""
    options = with_bundle_stop(options, runtime.bundle.stop_threshold, runtime.bundle.stop_calibration)
    stepper.begin_turn(replace(options, max_sentences=min(options.max_sentences, room)))
    return sentence_loop(runtime, stepper, prompt, options, room=room, max_sentences=options.max_sentences,
                         max_tokens=options.max_tokens or None, stop_threshold=options.stop_threshold,
                         min_sentences=options.min_sentences, stop_calibration=options.stop_calibration,
                         **loop_options)


@dataclass
class ChatSession:
    runtime: EdgeRuntime
    stepper: RemoteStepper
    turns: int = 0

    def connect(self) -> None:
        self.stepper.connect()

    def turn(self, text: str | Sequence[str], options: AnswerOptions = AnswerOptions(),
             interrupted: Callable[[], bool] = lambda: False) -> Iterator[SentenceEvent | TurnEnd]:
        """One user turn: TurnError now if it cannot run (bad prompt, no room), else an iterator
        that yields each sentence as soon as it is decoded, then a TurnEnd. `text`: the prompt, or
        several texts (messages) that become its sentences one after the other, each segmented on its own.

        `interrupted()` is checked before each sentence: the sentence yielded last is always
        appended first, so the context holds exactly what the user saw. A KeyboardInterrupt
        raised inside (a second Ctrl-C) drops the stream; the next turn rebuilds the session."""
        try:
            prompt = [ids for t in ([text] if isinstance(text, str) else text)
                      for ids in self.runtime.prompt_sentences(t)]
        except PromptError as e:
            raise TurnError(str(e)) from None
        stepper = self.stepper
        used = len(stepper.history)
        room = stepper.room or (stepper.info.max_sentences if stepper.info else 0)
        if used + len(prompt) >= room:
            raise TurnError(f"the conversation holds {used} of the {room} sentences this model's context has room "
                            f"for; a prompt of {len(prompt)} sentence(s) leaves no room for an answer: start a new "
                            "conversation (/reset in edge-chat, reset() in the API)")
        self.turns += 1
        events = answer(self.runtime, stepper, prompt, options, room=room - used - len(prompt), turn=self.turns,
                        context_used=used, interrupted=interrupted)
        return self._dropping_on_abort(events)

    def _dropping_on_abort(self, events: Iterator) -> Iterator:
        try:
            yield from events
        except KeyboardInterrupt:
            # mid-call: the stream's state is unknown; the next append rebuilds the session
            self.stepper.drop("an answer was aborted mid-step")
            raise

    def reset(self) -> None:
        """Forget the conversation; a new cloud session (edge.remote.RemoteStepper.reset)."""
        self.turns = 0
        self.stepper.reset()

    def close(self) -> None:
        self.stepper.close()
