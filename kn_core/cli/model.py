"""`kn model info|fetch` and `kn predict`."""

from __future__ import annotations

from .checks import whole_number
from .common import COMMON, CliError, emit, load, project_of, say, store_evaluation


def cmd_model_fetch(args) -> int:
    from ..models import ensure_default_model
    from ..tasks import Task

    path = ensure_default_model(Task(on_progress=lambda fraction, message: say(f"[default model] {message}")))
    emit(args, {"path": str(path)}, f"default model ready in {path}")
    return 0


def cmd_model_info(args) -> int:
    lm = load(args)
    info = lm.describe()
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
    text = "\n".join(f"{key}: {value}" for key, value in info.items())
    emit(args, info, text)
    return 0


def cmd_predict(args) -> int:
    from ..evaluation import predict

    if not args.prompt.strip():
        raise CliError("the prompt is empty; give the text whose next token (or mask) to predict")
    lm = load(args)
    predictions = predict(lm, args.prompt, args.top)
    doc = {"prompt": args.prompt, "predictions": [{"token": p["token"], "prob": p["prob"]} for p in predictions]}
    store_evaluation(args, lm, "predict", doc, {"top": args.top})
    emit(args, doc, "\n".join(f"{p['prob']:.4f}  {p['token']!r}" for p in predictions))
    return 0


def add_commands(sub) -> None:
    model = sub.add_parser("model", help="the model: info, fetch the embedded default")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("info", parents=[COMMON], help="family, kind, layers, neurons, hidden size, weight sha256") \
        .set_defaults(func=cmd_model_info)
    model_sub.add_parser("fetch", parents=[COMMON], help="download and convert the embedded default model once") \
        .set_defaults(func=cmd_model_fetch)

    predict = sub.add_parser("predict", parents=[COMMON], help="next token (causal) or mask fill (masked)")
    predict.add_argument("prompt")
    predict.add_argument("--top", type=whole_number, default=10)
    predict.set_defaults(func=cmd_predict)
