"""Chat about one image in the terminal; the answer streams as it is generated. Empty input or EOF ends it.

    llava-uta-chat --model-path checkpoints/llava-uta --image-file cat.png
    llava-uta-chat --model-path checkpoints/llava-uta-lora --image-file cat.png --temperature 0
    llava-uta-chat --model-path checkpoints/llava-uta-pretrain --model-base vicuna-7b --image-file cat.png \\
        --conv-mode plain
"""

from __future__ import annotations

import argparse

from PIL import Image

from llava_uta.argparsing import ArgumentParser
from llava_uta.serve.chat import ChatSession
from llava_uta.serve.loader import add_model_arguments, load_from_args


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(
        prog="llava-uta-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args(argv)

    with Image.open(args.image_file) as image:
        session = ChatSession(load_from_args(args), args.conv_mode, image.convert("RGB"))
    roles = ("USER", "ASSISTANT")
    while True:
        try:
            question = input(f"{roles[0]}: ").strip()
        except EOFError:
            question = ""
        if not question:
            print()
            return
        print(f"{roles[1]}: ", end="", flush=True)
        for piece in session.ask(question, args.temperature, args.top_p, args.max_new_tokens):
            print(piece, end="", flush=True)
        print()


if __name__ == "__main__":
    main()
