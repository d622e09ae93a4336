"""Gradio web demo: chat about an uploaded image, answers streamed from one shared model.

    llava-uta-web --model-path checkpoints/llava-uta                       # http://127.0.0.1:7860
    llava-uta-web --model-path checkpoints/llava-uta-lora --host 0.0.0.0 --port 8000 --concurrency 4
    llava-uta-web --model-path checkpoints/llava-uta --shapes-dir playground/data/shapes --share
    llava-uta-web --api-url http://gpu1:8000 http://gpu2:8000 --api-key "$KEY"     # llava-uta-serve servers

The examples under the chat are ShapesWorld bench images and questions when `--shapes-dir` is given or the model's
config.json records ShapesWorld training data (llava-uta-train writes it), real photos otherwise (examples.py).

Each browser session keeps its own ChatSession (in a gr.State) over the one loaded model; all generation goes
through it. With `--api-url` the page loads no model: each conversation is a RemoteChatSession on one of the
`llava-uta-serve` servers (api_client.py), LLaVA's controller and model workers with OpenAI's protocol in
between. A new image, a new preprocessing mode or "Clear" starts a new conversation. Requests wait in
Gradio's queue, `--concurrency` of them generating at a time. The named endpoint `/chat` answers one question
about one image for scripts:

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("cat.png"), "What is it?", 0.0, 1.0, 64, "crop",
                                             api_name="/chat")
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio import FileData
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN

from llava_uta.argparsing import ArgumentParser
from llava_uta.serve.api_client import ApiServers, RemoteChatSession
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.examples import example_rows, shapes_source
from llava_uta.serve.images import MODES, open_upload, prepare
from llava_uta.serve.loader import LoadedModel, add_model_arguments, load_from_args

Messages = list[dict[str, str]]
ROLES = ("user", "assistant")


@dataclass
class ImageChat:
    """What the UI needs from a model: new sessions fed preprocessed images, on this machine or on API servers."""

    start: Callable[[Image.Image | None], ChatSession | RemoteChatSession]
    pad_color: tuple[int, int, int]

    @classmethod
    def local(cls, loaded: LoadedModel, conv_mode: str | None = None) -> ImageChat:
        """Sessions over the model loaded here."""
        mean = getattr(loaded.processor.image_processor, "image_mean", (0.5, 0.5, 0.5))
        return cls(lambda image: ChatSession(loaded, conv_mode, image), tuple(round(255 * m) for m in mean))

    @classmethod
    def remote(cls, servers: ApiServers) -> ImageChat:
        """Sessions on OpenAI-compatible servers; "pad" fills with CLIP's mean colour, as LLaVA's towers expect."""
        return cls(lambda image: RemoteChatSession(servers, image), tuple(round(255 * m) for m in OPENAI_CLIP_MEAN))

    def session(self, image_path: str | None, mode: str) -> ChatSession | RemoteChatSession:
        """A new conversation about the image at `image_path` (none: text only); raises gr.Error for a bad file."""
        try:
            image = prepare(open_upload(image_path), mode, self.pad_color) if image_path else None
            return self.start(image)
        except (ValueError, ConnectionError) as err:
            raise gr.Error(str(err)) from err


def to_messages(turns: list[str]) -> Messages:
    return [{"role": ROLES[i % 2], "content": text} for i, text in enumerate(turns)]


def stream_turn(history: Messages, question: str, pieces: Iterator[str]) -> Iterator[Messages]:
    """The chat after `history`, with `question` and its answer growing piece by piece."""
    answer = ""
    try:
        yield [*history, *to_messages([question, answer])]
        for piece in pieces:
            answer += piece
            yield [*history, *to_messages([question, answer])]
    except ValueError as err:  # invalid generation settings
        raise gr.Error(str(err)) from err


def build_demo(bot: ImageChat, examples: list[list[str]]) -> gr.Blocks:
    with gr.Blocks(title="LLaVA-UTA") as demo:
        gr.Markdown("# LLaVA-UTA\nUpload an image and ask about it. A new image starts a new conversation.")
        session = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="image")
                mode = gr.Radio(list(MODES), value="crop", label="Make non-square images square by")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.1, 1.0, value=0.7, step=0.05, label="Top P")
                    max_new_tokens = gr.Slider(16, 1024, value=512, step=16, label="Max output tokens")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", height=480, elem_id="chat")
                message = gr.Textbox(placeholder="Ask about the image and press Enter", label="Message",
                                     elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    stop = gr.Button("Stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
        gr.Examples(examples, inputs=[image, message], label="Examples")

        def respond(image_path, text, state, mode_name, temp, p, max_tokens):
            if not text.strip():
                raise gr.Error("Type a question first.")
            state = state or bot.session(image_path, mode_name)
            history = to_messages(state.turns)
            for messages in stream_turn(history, text, state.ask(text, temp, p, int(max_tokens))):
                yield "", messages, state

        def redo(state, temp, p, max_tokens):
            if state is None or not state.turns:
                raise gr.Error("Nothing to regenerate yet.")
            question = state.turns[-2]
            pieces = state.regenerate(temp, p, int(max_tokens))  # drops the last answer now
            for messages in stream_turn(to_messages(state.turns), question, pieces):
                yield messages, state

        settings = [mode, temperature, top_p, max_new_tokens]
        ask_inputs, ask_outputs = [image, message, session, *settings], [message, chat, session]
        for event in (message.submit, send.click):
            event(respond, ask_inputs, ask_outputs, api_visibility="private")
        regenerate.click(redo, [session, *settings[1:]], [chat, session], api_visibility="private")

        def halt(state):
            if state is not None:
                state.cancel()  # ends the generation; the partial answer stays in the conversation

        # Stop only sets the cancel flag, outside the queue: the streaming event then ends by itself after saving
        # the partial answer (Gradio's `cancels=` would close the generator first and could lose the turn).
        stop.click(halt, [session], None, queue=False, api_visibility="private")
        for restart in (clear.click, image.change, mode.change):
            restart(lambda: ([], None), None, [chat, session], api_visibility="private")

        def chat_api(
            image: FileData | None,
            message: str,
            temperature: float = 0.2,
            top_p: float = 0.7,
            max_new_tokens: int = 512,
            mode: str = "crop",
        ) -> Iterator[str]:
            """One question about one image in a fresh conversation; yields the answer so far, then all of it."""
            state = bot.session(image["path"] if image else None, mode)
            pieces = state.ask(message, temperature, top_p, int(max_new_tokens))
            for messages in stream_turn([], message, pieces):
                yield messages[-1]["content"]

        gr.api(chat_api, api_name="chat")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="llava-uta-web", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser, required=False)
    parser.add_argument("--api-url", nargs="+", metavar="URL",
                        help="talk to these llava-uta-serve (OpenAI-compatible) servers instead of loading a model; "
                        "each new conversation goes to the next one")
    parser.add_argument("--api-key", help="the servers' key (--api-url)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--concurrency", type=int, default=2, help="requests generating at the same time")
    parser.add_argument(
        "--shapes-dir",
        type=Path,
        help="a ShapesWorld folder whose bench images become the examples (default: the one the model was trained "
        "on, if recorded; otherwise photos)",
    )
    args = parser.parse_args(argv)
    if (args.model_path is None) == (args.api_url is None):
        parser.error("give either --model-path (load the model here) or --api-url (use llava-uta-serve servers)")

    shapes_dir, why = shapes_source(args.model_path, args.shapes_dir)
    try:
        examples = example_rows(Path(tempfile.mkdtemp(prefix="llava-uta-examples-")), shapes_dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"examples: {why}")
    bot = ImageChat.remote(ApiServers(args.api_url, args.api_key)) if args.api_url else \
        ImageChat.local(load_from_args(args), args.conv_mode)
    demo = build_demo(bot, examples)
    demo.queue(default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
