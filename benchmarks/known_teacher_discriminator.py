"""Can the discriminator learn what GAD needs? An offline probe on the known-teacher set-up.

A fixed pool of student samples (``--samples`` per train prompt from ``--student``, temperature 1)
against the teacher's answers in the benchmark's training data. The discriminator (the engine's
own :func:`gadchat.models.load_discriminator`, initialised from the student) is trained with the
Bradley-Terry loss (:func:`gadchat.losses.bradley_terry_loss`) on batches of ``--prompts`` prompts,
as the warm-up does but without the actor moving, and evaluated every ``--eval-every`` steps on
held-out prompts: pairwise accuracy (teacher answer scored above a student sample) and the
within-group Spearman correlation of its score with the Bayes-optimal target
``log p_T(y|x) - log p_S(y|x)`` of the held-out student samples (teacher log-probs read only here).

    python benchmarks/known_teacher_discriminator.py --lr 2e-4 1e-3 --pooling last sum --steps 200

Prints one line per evaluation and a summary table; ``--record`` stores it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def sample_pool(student: str, messages: list, n: int, max_new_tokens: int, seed: int) -> list:
    from gadchat.generation import GenerationSettings, Generator

    generator = Generator(student, seed=seed)
    try:
        out = generator.generate(messages, GenerationSettings(max_new_tokens=max_new_tokens, temperature=1.0, n=n, seed=seed))
    finally:
        generator.close()
    return [[list(c.token_ids) for c in group] for group in out]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--student", default="builtin:kt-student")
    parser.add_argument("--lr", type=float, nargs="+", default=[2e-4, 1e-3])
    parser.add_argument("--pooling", nargs="+", default=["last", "sum"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (each with its teacher answer and samples)")
    parser.add_argument("--samples", type=int, default=4, help="student samples per prompt")
    parser.add_argument("--grad-clip", type=float, default=0.2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", default="", help="store as benchmarks/results/q_known_teacher_NAME.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from applications.known_teacher import TEACHER_MAX_NEW_TOKENS, prepare
    from gadchat import teacher_metrics as tm
    from gadchat.data import encode_prompt, encode_response
    from gadchat.batch import SequenceBatch
    from applications.known_teacher_eval import load_scorer, read_rows, response_log_probs
    from gadchat.losses import bradley_terry_loss
    from gadchat.models import load_discriminator, resolve_model_path

    torch.set_num_threads(1)
    paths = prepare("auto")
    student = resolve_model_path(args.student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    pad = tokenizer.pad_token_id
    train_rows, test_rows = read_rows(Path(paths["train"])), read_rows(Path(paths["test"]))[: args.eval_prompts]
    started = time.perf_counter()
    pools = {name: sample_pool(student, [r["content"] for r in rows], args.samples, TEACHER_MAX_NEW_TOKENS, args.seed)
             for name, rows in (("train", train_rows), ("test", test_rows))}
    print(f"[probe] sampled {args.samples} student answers for {len(train_rows)} + {len(test_rows)} prompts "
          f"in {time.perf_counter() - started:.0f} s", flush=True)

    def encoded(rows, pool):
        return [(encode_prompt(tokenizer, r["content"]), encode_response(tokenizer, r["teacher_response"]),
                 [s or [pad] for s in samples]) for r, samples in zip(rows, pool)]

    train, test = encoded(train_rows, pools["train"]), encoded(test_rows, pools["test"])
    # The Bayes-optimal target of the held-out samples: log p_T - log p_S (sequence sums).
    prompts = [p for p, _, samples in test for _ in samples]
    responses = [s for _, _, samples in test for s in samples]
    teacher_lp, mask = response_log_probs(load_scorer(paths["teacher"]), prompts, responses, pad)
    student_lp, _ = response_log_probs(load_scorer(student), prompts, responses, pad)
    log_ratio = tm.sequence_sums(teacher_lp - student_lp, mask).view(len(test), -1).tolist()

    def batch_scores(model, rows):
        teacher = SequenceBatch.build([p for p, _, _ in rows], [t for _, t, _ in rows], pad)
        student_batch = SequenceBatch.build([p for p, _, s in rows for _ in s], [x for _, _, s in rows for x in s], pad)
        t = model(teacher.input_ids, teacher.attention_mask, teacher.last_index, teacher.response_mask)
        s = model(student_batch.input_ids, student_batch.attention_mask, student_batch.last_index, student_batch.response_mask)
        return t, s.view(len(rows), -1)

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            t_all, s_all = zip(*(batch_scores(model, test[i : i + 16]) for i in range(0, len(test), 16)))
        model.train()
        t_all, s_all = torch.cat(t_all), torch.cat(s_all)
        accuracy = float((t_all[:, None] > s_all).float().mean())
        rho = tm.within_group_spearman(s_all.tolist(), log_ratio)["mean"]
        return accuracy, rho

    rows_out = []
    for lr, pooling in itertools.product(args.lr, args.pooling):
        torch.manual_seed(args.seed)
        model = load_discriminator(student, pad, torch.float32, "sdpa", seed=args.seed, pooling=pooling)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        curve = [(0, *evaluate(model))]
        started = time.perf_counter()
        for step in range(args.steps):
            picks = [train[order[(step * args.prompts + k) % len(train)]] for k in range(args.prompts)]
            t, s = batch_scores(model, picks)
            loss = bradley_terry_loss(t, s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve.append((step + 1, *evaluate(model)))
                print(f"[probe] lr {lr:g} pooling {pooling}: step {step + 1} held-out accuracy {curve[-1][1]:.3f}, "
                      f"Spearman with log p_T - log p_S {curve[-1][2]:+.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        rows_out.append([f"{lr:g}", pooling, *[f"{a:.2f} / {r:+.2f}" for _, a, r in curve]])
    steps = [c[0] for c in curve]
    columns = ["D lr", "pooling", *[f"step {s}: acc / rho" for s in steps]]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in rows_out:
        print("| " + " | ".join(row) + " |")
    if args.record:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from common import save_result

        save_result(f"q_known_teacher_{args.record}", {
            "title": "Known-teacher quality: can the discriminator learn the log-ratio? (offline probe)",
            "description": (f"Discriminator initialised from {args.student}, Bradley-Terry on a fixed pool of {args.samples} "
                            f"student samples per train prompt vs the teacher's answers, {args.prompts} prompts per step, "
                            f"grad clip {args.grad_clip}; held-out pairwise accuracy (teacher above sample) and within-group "
                            f"Spearman with log p_T - log p_S on {len(test)} held-out prompts."),
            "table": {"columns": columns, "rows": rows_out}}, "python benchmarks/known_teacher_discriminator.py "
            + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
