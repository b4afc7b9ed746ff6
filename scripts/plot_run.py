"""Draw a training run's loss curves to a PNG file.

    python scripts/plot_run.py outputs/2026-11-26/05-00-00 --png docs/

writes ``docs/loss_curve.png`` from the run's TensorBoard logs (``<run>/tensorboard``).
"""

from pathlib import Path

from llm.checks import ArgumentParser, output_folder
from llm.errors import one_line_errors
from llm.inspect import loss_curve_figure, save_figures


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a training run's output folder")
    parser.add_argument(
        "--png", metavar="DIR", type=output_folder, required=True, help="write loss_curve.png here"
    )
    args = parser.parse_args()
    with one_line_errors():
        figure = loss_curve_figure(args.run / "tensorboard")
        for path in save_figures({"loss_curve": figure}, png_dir=args.png):
            print(path)


if __name__ == "__main__":
    main()
