"""Distributed checks of PrefixRoutedLoss, run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Usage: torchrun --nproc_per_node 2 tests/distributed/ddp_checks.py TINY_BASE_PATH RESULT_JSON

1. ``gather``: with ``gather_across_devices=True`` the mean of the processes' losses (and the gradients they
   send back to their own embeddings) equals the single-process loss on the concatenated batch, for the plain
   loss and for the cached loss's chunked loss stage.
2. ``with_fix``: DDP training (plain and cached loss, with cross-device negatives, ``find_unused_parameters``
   False and True) over a text-only batch, then an image batch, then a batch with images on one process only.
3. ``without_fix``: the same runs with the vision hook removed, to show that DDP fails without it.

Rank 0 writes the results as JSON; every scenario records "ok" or the error it raised.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def check_gather(base_path: str, rank: int, world_size: int) -> dict:
    from st_viomni import build_model
    from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, make_label

    torch.manual_seed(1234)  # the same full batch on every process
    rows_per_rank, dim = 4, 8
    total_rows = rows_per_rank * world_size
    anchors = torch.randn(total_rows, dim, dtype=torch.float64)
    positives = torch.randn(total_rows, dim, dtype=torch.float64)
    negatives = torch.randn(total_rows, dim, dtype=torch.float64)
    tasks = ["ocr", "vqa_multi", "text_pair", "instr", "vqa_single", "ocr", "text_pair", "vqa_multi"]
    scores = [None, None, 0.7, None, None, None, 0.0, None]
    # Row 1 (process 0) and row 6 (process 1) share a positive, so do rows 0 and 5: masking must cross processes.
    answers = ["answer-a", "đỏ", "x", "y", "z", "answer-a", "đỏ", "w"]
    positives[6] = positives[1]
    positives[5] = positives[0]
    # The hardest negative of row 0 (ocr, process 0) is process 1's positive 4, close enough to make the hinge bite.
    positives[4] = anchors[0] + 0.1 * torch.randn(dim, dtype=torch.float64)
    score_tensor = torch.tensor([float("nan") if score is None else score for score in scores])
    labels = torch.tensor([make_label(*row) for row in zip(tasks, scores, answers)], dtype=torch.float64)

    single = PrefixRoutedLoss(torch.nn.Module(), temperature=0.1)
    full_anchors = anchors.clone().requires_grad_()
    full_loss = single.compute_loss_from_embeddings(
        full_anchors, positives, tasks, score_tensor, answers, negatives=[negatives]
    )
    full_loss.backward()
    # Each process's embeddings receive the gradient of the *sum* of the processes' losses (DDP then averages
    # parameter gradients), i.e. world_size times the gradient of the mean.
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    expected_gradient = full_anchors.grad[rows] * world_size

    def mean_over_processes(loss: torch.Tensor) -> float:
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        return (loss / world_size).item()

    gathered = PrefixRoutedLoss(torch.nn.Module(), temperature=0.1, gather_across_devices=True)
    local_anchors = anchors[rows].clone().requires_grad_()
    local_loss = gathered.compute_loss_from_embeddings(
        local_anchors, positives[rows], tasks[rows], score_tensor[rows], answers[rows], negatives=[negatives[rows]]
    )
    local_loss.backward()

    # The cached loss's loss stage, on the same embeddings cut into mini-batches of 3 and 1 rows.
    model = build_model(base_path, embedding_dim=dim)
    cached = CachedPrefixRoutedLoss(model, temperature=0.1, gather_across_devices=True, mini_batch_size=3)
    reps = [[column[rows][:3].clone(), column[rows][3:].clone()] for column in (anchors, positives, negatives)]
    reps = [[mini_batch.requires_grad_() for mini_batch in column] for column in reps]
    cached_loss = cached.calculate_loss(reps, labels[rows], with_backward=True)
    cached_anchor_gradient = torch.cat([mini_batch.grad for mini_batch in reps[0]])

    row_0_in_full_batch = single.per_sample_losses(anchors, positives, tasks, score_tensor, answers)[0]
    row_0_in_process_0_batch = single.per_sample_losses(
        anchors[:4], positives[:4], tasks[:4], score_tensor[:4], answers[:4]
    )[0]
    return {
        "single_process_loss": full_loss.item(),
        "mean_loss": mean_over_processes(local_loss),
        "max_gradient_error": (local_anchors.grad - expected_gradient).abs().max().item(),
        "cached_mean_loss": mean_over_processes(cached_loss),
        "cached_max_gradient_error": (cached_anchor_gradient - expected_gradient).abs().max().item(),
        "gradient_scale": expected_gradient.abs().max().item(),
        # Row 0's loss depends on rows of the other process (its hardest negative and InfoNCE terms).
        "row_0_cross_process_effect": (row_0_in_full_batch - row_0_in_process_0_batch).item(),
    }


def ddp_batches(rank: int):
    from PIL import Image

    from st_viomni import format_input

    red = Image.new("RGB", (56, 56), (220, 30, 30))
    blue = Image.new("RGB", (84, 56), (30, 30, 220))

    def row(task, anchor, images, positive, score=None):
        return task, format_input(task, anchor, images), format_input(task, positive), score, positive

    text_rows = [row("text_pair", f"câu số {rank}", [], "một câu", 0.6), row("instr", "Dịch: xin chào", [], "hello")]
    image_rows = [row("vqa_single", "Màu gì?", [red], "đỏ"), row("ocr", "Chữ gì?", [blue], "xanh")]
    one_sided = image_rows if rank == 0 else text_rows
    return {"text_only": text_rows, "images": image_rows, "images_on_rank_0_only": one_sided}


def run_ddp_scenario(base_path: str, rank: int, cached: bool, find_unused: bool, without_fix: bool) -> dict:
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator
    from torch.nn.parallel import DistributedDataParallel

    from st_viomni import build_model
    from st_viomni.losses import CachedPrefixRoutedLoss, PrefixRoutedLoss, make_label, remove_vision_tower_hook

    torch.manual_seed(0)
    model = build_model(base_path, embedding_dim=16)
    model.train()
    if cached:
        loss_fn = CachedPrefixRoutedLoss(model, mini_batch_size=1, gather_across_devices=True)
    else:
        loss_fn = PrefixRoutedLoss(model, gather_across_devices=True)
    if without_fix:
        remove_vision_tower_hook(model)
    ddp_model = DistributedDataParallel(model, find_unused_parameters=find_unused)
    # What SentenceTransformerTrainer.override_model_in_loss does.
    loss_fn.model = ddp_model
    if cached:
        loss_fn.loss.model = ddp_model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    vision_parameter = next(model[0].model.visual.parameters())
    vision_before = vision_parameter.detach().clone()
    # Batches go through sentence-transformers' own collator and the trainer's feature split, as in training. (Not
    # model.preprocess directly: DDP's unused-parameter search finds no tensor in the BatchFeature it returns and
    # with find_unused_parameters=True then fails on every batch, image or not.)
    collator = SentenceTransformerDataCollator(preprocess_fn=model.preprocess)
    steps = []
    try:
        for name, rows in ddp_batches(rank).items():
            batch = collator(
                [
                    {"anchor": anchor, "positive": positive, "label": make_label(task, score, positive_text)}
                    for task, anchor, positive, score, positive_text in rows
                ]
            )
            features, labels = SentenceTransformerTrainer.collect_features(None, batch)
            output = loss_fn(features, labels)
            loss = torch.stack(list(output.values())).sum() if isinstance(output, dict) else output
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps.append(name)
        status = "ok"
    except Exception as error:  # noqa: BLE001 - the error is the result
        status = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        traceback.print_exc()
    # Parameters must be identical on every process after synchronised steps.
    checksum = torch.stack([parameter.detach().double().sum() for parameter in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return {
        "status": status,
        "steps": steps,
        "parameters_in_sync": all(torch.equal(gathered[0], value) for value in gathered),
        "vision_tower_trained": not torch.equal(vision_before, vision_parameter.detach()),
    }


def main() -> None:
    base_path, result_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results: dict = {"gather": check_gather(base_path, rank, world_size)}
    only = os.environ.get("DDP_CHECKS_ONLY")  # run one scenario by name, when debugging
    # The runs without the fix come last: a DDP error must not be able to disturb the runs that count.
    for without_fix in (False, True):
        report = results["without_fix" if without_fix else "with_fix"] = {}
        for cached in (False, True):
            for find_unused in (False, True):
                key = f"{'cached' if cached else 'plain'}_find_unused_{find_unused}"
                if only and key != only:
                    continue
                report[key] = run_ddp_scenario(base_path, rank, cached, find_unused, without_fix)
                dist.barrier()
    if rank == 0:
        with open(result_path, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
