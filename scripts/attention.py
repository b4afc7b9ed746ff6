"""Attention maps as pictures, to PNG files and/or a TensorBoard run.

    python scripts/attention.py model CHECKPOINT "The cat sat on the mat" --png maps/
    python scripts/attention.py ladder --png maps/ --tensorboard runs/ladder

``model`` draws one figure per layer of a model (a panel per head) reading the prompt;
``ladder`` draws what each step of the attention ladder computes on the six-token toy input.
"""

import sys

from llm.checkpoint import load_model_and_tokenizer
from llm.checks import ArgumentParser, at_least, output_folder
from llm.errors import one_line_errors
from llm.inspect import TOY_INPUTS, TOY_TOKENS, ladder_figure, model_attention_figures, save_figures
from llm.tokenizer import TokenizerOptions


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model_parser = commands.add_parser("model", help="a model's maps for a prompt, per layer")
    model_parser.add_argument("checkpoint", help=".ckpt, .safetensors or Hugging Face GPT-2 folder")
    model_parser.add_argument("prompt", help="the text to read (a few tokens keep maps legible)")
    model_parser.add_argument(
        "--tokenizer-path", help="a local ranks file for the model's tokenizer (offline)"
    )
    model_parser.add_argument(
        "--max-tokens",
        type=at_least(1),
        default=64,
        help="draw the prompt's first N tokens (default 64): a map is N x N cells per head",
    )
    commands.add_parser("ladder", help="each attention ladder step on the toy input")
    for command in commands.choices.values():
        command.add_argument(
            "--png", metavar="DIR", type=output_folder, help="write one PNG per figure here"
        )
        command.add_argument(
            "--tensorboard", metavar="DIR", type=output_folder, help="write to this TensorBoard run"
        )
    args = parser.parse_args()
    if args.png is None and args.tensorboard is None:
        parser.error("give --png DIR, --tensorboard DIR, or both")

    with one_line_errors():
        if args.command == "model":
            flag = TokenizerOptions(name=None, path="--tokenizer-path")
            model, tokenizer = load_model_and_tokenizer(
                args.checkpoint, "cpu", args.tokenizer_path, flag
            )
            prompt_tokens = len(tokenizer.encode(args.prompt))
            max_tokens = min(args.max_tokens, model.config.context_length)
            if prompt_tokens > max_tokens:
                limit = "--max-tokens" if max_tokens == args.max_tokens else "the model's context"
                print(
                    f"drawing the prompt's first {max_tokens} of {prompt_tokens} tokens ({limit})",
                    file=sys.stderr,
                )
            figures = model_attention_figures(model, tokenizer, args.prompt, max_tokens)
        else:
            figures = {"ladder": ladder_figure(TOY_INPUTS, TOY_TOKENS)}
        paths = save_figures(figures, args.png, args.tensorboard)
    for path in paths:
        print(path)
    if args.tensorboard is not None:
        print(f"TensorBoard: tensorboard --logdir {args.tensorboard}")


if __name__ == "__main__":
    main()
