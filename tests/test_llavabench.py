"""LLaVA-Bench evaluator: answer records and resume, judge retries against a misbehaving local server, pairing,
rule files and their keys, LLaVA's exact score parsing, summary arithmetic, and the offline ShapesWorld judge."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from llava_helpers import make_lm_dir, make_tokenizer_dir, make_tower_dir
from transformers import AutoImageProcessor, AutoTokenizer

from llava_uta.data.shapes.scene import COLORS, PLURALS
from llava_uta.eval.llavabench.__main__ import main as bench_main
from llava_uta.eval.llavabench.answer import answer_questions, get_chunk
from llava_uta.eval.llavabench.jsonl import AppendLog, read_jsonl
from llava_uta.eval.llavabench.judges import (
    HttpJudge,
    JudgeError,
    ReviewItem,
    build_messages,
    llava_parse_score,
    parse_score,
)
from llava_uta.eval.llavabench.review import OWN_RULE, RuleFile, is_failed, pair_by_id, review_all
from llava_uta.eval.llavabench.shapes_judge import score_answer
from llava_uta.eval.llavabench.summarize import COMPARABILITY, summarize_reviews
from llava_uta.model.llava_builder import build_llava
from llava_uta.model.processors import make_processor
from llava_uta.serve.loader import load_pretrained_model

RULES = RuleFile.load(OWN_RULE)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A small generated ShapesWorld bench (6 images, 12 questions)."""
    out = tmp_path_factory.mktemp("shapes") / "world"
    args = ["--out", str(out), "--num-clip", "8", "--num-pretrain", "8", "--num-stage1", "4", "--num-stage2", "4",
            "--num-bench-images", "6", "--workers", "1"]
    subprocess.run([sys.executable, "-m", "llava_uta.data.shapes", *args], check=True, capture_output=True)
    return out / "eval" / "llava-bench-shapes"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained stage-2 style folder (model + processor), saved as training saves one."""
    root = tmp_path_factory.mktemp("bench_model")
    lm, tower = make_lm_dir(root / "lm", make_tokenizer_dir(root / "tok")), make_tower_dir(root / "tower")
    tokenizer = AutoTokenizer.from_pretrained(lm)
    model = build_llava(str(lm), str(tower), tokenizer)
    model.save_pretrained(root / "llava")
    make_processor(model, tokenizer, AutoImageProcessor.from_pretrained(tower), "pad").save_pretrained(root / "llava")
    return root / "llava"


def _other(value, options) -> str:
    return next(o for o in options if o != value)


def _wrong(facts: dict) -> str:
    """An answer that gets every fact wrong."""
    if "objects" in facts:
        return " ".join(
            f"There is a {_other(o['color'], COLORS)} {_other(o['shape'], PLURALS)} "
            f"in the {_other(o['position'], ('center', 'top left'))}."
            for o in facts["objects"]
        )
    if "shape" in facts:
        return f"It is a {_other(facts['color'], COLORS)} {_other(facts['shape'], PLURALS)}."
    (key, value), = facts.items()
    return {
        "color": lambda: f"It is {_other(value, COLORS)}.",
        "count": lambda: f"There are {value + 1}.",
        "answer": lambda: "No." if value == "yes" else "Yes.",
        "position": lambda: f"It is in the {_other(value, ('center', 'top left'))}.",
    }[key]()


def test_offline_judge_gives_10_to_references_and_1_to_wrong_answers(bench, tmp_path):
    questions = read_jsonl(bench / "questions.jsonl")
    truth = {t["question_id"]: t for t in read_jsonl(bench / "ground_truth.jsonl")}
    wrong = [{"question_id": q["question_id"], "text": _wrong(truth[q["question_id"]]["facts"]), "answer_id": "w"}
             for q in questions]
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps(w) + "\n" for w in wrong))
    bench_main(["review", "--question", str(bench / "questions.jsonl"), "--context", str(bench / "context.jsonl"),
                "--answer-list", str(bench / "answers_gpt4.jsonl"), str(tmp_path / "wrong.jsonl"),
                "--output", str(tmp_path / "reviews.jsonl"), "--judge", "shapes"])
    reviews = read_jsonl(tmp_path / "reviews.jsonl")
    assert len(reviews) == len(questions) and all(r["tuple"] == [10.0, 1.0] for r in reviews), reviews
    all_row = summarize_reviews(reviews)[-1]
    assert (all_row.category, all_row.relative, all_row.reference, all_row.model) == ("all", 10.0, 100.0, 10.0)


def test_offline_judge_partial_credit():
    objects = [{"shape": "star", "color": "red", "size": "small", "position": "top left"},
               {"shape": "circle", "color": "blue", "size": "large", "position": "center"}]
    half = "There is a red star in the top left corner. There is a green circle in the center."
    assert score_answer({"objects": objects}, half)[0] == 6  # 1 + 9 * 1/2, rounded
    assert score_answer({"color": "red"}, "It is red or maybe blue.")[0] == 6
    assert score_answer({"count": 2}, "I count three, no wait: the answer is two.")[0] == 10


def test_answer_records_resume_and_chunks(bench, model_dir, tmp_path):
    loaded = load_pretrained_model(model_dir, device="cpu")
    questions = read_jsonl(bench / "questions.jsonl")[:3]
    out = tmp_path / "answers.jsonl"
    assert answer_questions(loaded, questions[:2], bench / "images", out, "tiny", max_new_tokens=4) == 2
    with open(out, "a") as f:
        f.write('{"question_id": 99, "text": "cut of')  # an interrupted write
    assert answer_questions(loaded, questions, bench / "images", out, "tiny", max_new_tokens=4) == 1
    records = read_jsonl(out)
    assert [r["question_id"] for r in records] == [0, 1, 2]
    for record, question in zip(records, questions, strict=True):
        assert set(record) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert record["prompt"] == question["text"] and record["model_id"] == "tiny" and len(record["answer_id"]) == 32
        assert record["metadata"]["temperature"] == 0.0
    assert get_chunk(list(range(10)), 3, 2) == [8, 9] and get_chunk(list(range(10)), 3, 0) == [0, 1, 2, 3]


def test_batched_answers_equal_one_by_one_greedy_answers(bench, model_dir, tmp_path):
    loaded = load_pretrained_model(model_dir, device="cpu")
    questions = read_jsonl(bench / "questions.jsonl")[:5]  # prompts of different lengths: left padding matters
    single, batched = tmp_path / "single.jsonl", tmp_path / "batched.jsonl"
    answer_questions(loaded, questions, bench / "images", single, "tiny", max_new_tokens=6)
    answer_questions(loaded, questions, bench / "images", batched, "tiny", max_new_tokens=6, batch_size=3)
    assert [r["text"] for r in read_jsonl(batched)] == [r["text"] for r in read_jsonl(single)]
    assert len({len(q["text"]) for q in questions}) > 1


class _Judge:
    """A chat-completions endpoint that misbehaves on purpose: `script` lists one behaviour per request."""

    def __init__(self, script: list[str]):
        self.script, self.requests = list(script), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, self.headers.get("Authorization"), body))
                action = judge.script.pop(0) if judge.script else "ok"
                if action in ("429", "500", "400"):
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    return
                if action == "slow":
                    threading.Event().wait(0.5)  # not time.sleep: the tests patch that for the client
                content = {"ok": "8 6\nfine.", "garbled": "Assistant 1 is better.", "comma": "7, 9\nok"}.get(action)
                payload = b"not json" if action == "badjson" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _item() -> ReviewItem:
    messages = build_messages("a red star", "What color?", "Red.", "Blue.", RULES.rule("llava_bench_conv"))
    return ReviewItem({"question_id": 0}, {"text": "Red."}, {"text": "Blue."}, "llava_bench_conv", messages)


def test_http_judge_retries_with_backoff_then_succeeds(monkeypatch):
    server = _Judge(["429", "500", "slow", "badjson", "ok"])
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    sleeps = []
    monkeypatch.setattr("llava_uta.eval.llavabench.judges.time.sleep", sleeps.append)
    try:
        judge = HttpJudge.from_env("JUDGE_KEY", base_url=server.url, model="judge-1", timeout=0.2, backoff=0.01)
        assert judge.review(_item()) == "8 6\nfine."
    finally:
        server.close()
    assert len(server.requests) == 5 and len(sleeps) == 4
    assert sleeps[2] > sleeps[1] > 0.01 * 1.99 and sleeps[0] == 0  # Retry-After 0, then 0.02, 0.04, ...
    path, auth, body = server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-1"
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_http_judge_gives_up_after_the_retry_limit_and_not_on_client_errors(monkeypatch):
    monkeypatch.setattr("llava_uta.eval.llavabench.judges.time.sleep", lambda s: None)
    server = _Judge(["500"] * 3 + ["400"])
    try:
        judge = HttpJudge(base_url=server.url, model="m", max_retries=2, backoff=0.0)
        with pytest.raises(JudgeError, match="after 2 retries"):
            judge.review(_item())
        with pytest.raises(JudgeError, match="400"):
            judge.review(_item())
    finally:
        server.close()
    assert len(server.requests) == 4


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_review_records_failures_and_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr("llava_uta.eval.llavabench.judges.time.sleep", lambda s: None)
    questions = [{"question_id": i, "image": "a.png", "text": f"q{i}", "category": c}
                 for i, c in enumerate(["conv", "detail", "complex", "conv"])]
    ref = [{"question_id": i, "text": f"ref {i}"} for i in range(4)]
    ours = [{"question_id": i, "text": f"ours {i}", "answer_id": f"a{i}"} for i in reversed(range(4))]  # any order
    contexts = {"a.png": {"image": "a.png", "caption": ["line one", "line two"]}}
    out = tmp_path / "reviews.jsonl"
    server = _Judge(["ok", "garbled", "500", "500"])
    try:
        judge = HttpJudge(base_url=server.url, model="m", max_retries=1, backoff=0.0)
        review_all(judge, questions[:3], contexts, ref[:3], ours[1:], RULES, out)
        log = review_all(judge, questions, contexts, ref, ours, RULES, out)  # resumes: only question 3 is new
    finally:
        server.close()
    records = read_jsonl(out)
    assert [r["question_id"] for r in records] == [0, 1, 2, 3] and len(log.records) == 4
    assert records[0]["tuple"] == [8.0, 6.0] and records[0]["answer1_id"] == 0 and records[0]["answer2_id"] == "a0"
    assert records[1]["tuple"] == [-1, -1] and "unparseable" in records[1]["error"]
    assert records[2]["tuple"] == [-1, -1] and "retries" in records[2]["error"]
    assert records[3]["tuple"] == [8.0, 6.0] and records[1]["category"] == "llava_bench_detail"
    user = server.requests[0][2]["messages"][1]["content"]
    assert user.startswith("[Context]\nline one\nline two\n\n[Question]\nq0\n\n[Assistant 1]\nref 0\n\n")
    assert user.endswith("[End of Assistant 2]\n\n[System]\n" + RULES.rule("llava_bench_conv")["prompt"] + "\n\n")
    rows = {r.category: r for r in summarize_reviews(records)}
    assert rows["all"].failed == 2 and rows["all"].reviews == 4 and rows["all"].relative == 75.0
    assert rows["all"].llava_relative == 71.4  # LLaVA's figure: means (8 - 1 - 1 + 8) / 4 and (6 - 1 - 1 + 6) / 4


def test_pairing_refuses_files_with_different_ids():
    questions = [{"question_id": i} for i in range(3)]
    answers = [{"question_id": i} for i in range(3)]
    with pytest.raises(ValueError, match=r"model lacks question ids 2.*model has ids that are not questions: 7"):
        pair_by_id(questions, answers, [{"question_id": 0}, {"question_id": 1}, {"question_id": 7}], ("ref", "model"))
    with pytest.raises(ValueError, match="more than once"):
        pair_by_id(questions, answers, answers + answers[:1], ("ref", "model"))


def test_parse_score():
    assert parse_score("8 6\nbecause") == (8.0, 6.0)
    assert parse_score("7.5, 9") == (7.5, 9.0)
    for bad in ("", "Assistant 1: 8", "8 6 5"):
        with pytest.raises(ValueError):
            parse_score(bad)


def test_summary_matches_llava_arithmetic_on_a_hand_computed_example(tmp_path):
    reviews = [
        {"category": "llava_bench_conv", "tuple": [8, 6]},
        {"category": "llava_bench_conv", "tuple": [9, 7]},
        {"category": "llava_bench_detail", "tuple": [7, 7]},
        {"category": "llava_bench_complex", "tuple": [10, 5]},
        {"category": "llava_bench_complex", "tuple": [6, 6]},
        {"category": "llava_bench_complex", "tuple": [9, 3]},
    ]
    rows = {r.category: r for r in summarize_reviews(reviews)}
    # conv: means 8.5 / 6.5 -> 76.5 %; complex: 8.333 / 4.667 -> 56.0 %; all: 8.167 / 5.667 -> 69.4 %
    assert (rows["conv"].relative, rows["conv"].reference, rows["conv"].model) == (76.5, 85.0, 65.0)
    assert (rows["detail"].relative, rows["detail"].reference, rows["detail"].model) == (100.0, 70.0, 70.0)
    assert (rows["complex"].relative, rows["complex"].reference, rows["complex"].model) == (56.0, 83.3, 46.7)
    assert (rows["all"].relative, rows["all"].reference, rows["all"].model) == (69.4, 81.7, 56.7)
    assert list(rows) == ["conv", "detail", "complex", "all"]
    first, second = _write(tmp_path / "m1.jsonl", reviews), _write(tmp_path / "m2.jsonl", reviews[:3])
    bench_main(["summarize", first, second, "--markdown", str(tmp_path / "s.md"), "--plot", str(tmp_path / "s.png")])
    table = (tmp_path / "s.md").read_text()
    assert "| all | 69.4 | 81.7 | 56.7 | 6 | 0 | 69.4 |" in table and "| m2 | 76.5 | 100.0 | n/a | 83.3 |" in table
    assert "NOT COMPARABLE" not in table  # both made with the same (unrecorded) judge and rule
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_append_log_drops_a_cut_off_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question_id": 1}\n{"question_id": 2')
    log = AppendLog(path)
    assert log.done_ids == {1}
    log.append({"question_id": 2})
    assert [r["question_id"] for r in read_jsonl(path)] == [1, 2]


def test_llava_parse_score_is_llavas_exactly_and_feeds_the_llava_column():
    # LLaVA: review.split('\n')[0].replace(',', ' ').split(' '), two floats or [-1, -1]
    for review, expected in [("8 6\nok", [8.0, 6.0]), ("8,6", [8.0, 6.0]), ("7.5 9", [7.5, 9.0])]:
        assert llava_parse_score(review) == expected
    for review in ("8, 6\nok", "8 6 ", "\n8 6\nok", " 8 6", "8  6", "Assistant 1: 8", "a b", ""):
        assert llava_parse_score(review) == [-1, -1], review
    assert parse_score("8, 6") == parse_score("8 6 ") == parse_score("\n8 6\nok") == (8.0, 6.0)  # ours: lenient
    reviews = [{"category": "llava_bench_conv", "content": "8, 6\nclose.", "tuple": [8.0, 6.0]},
               {"category": "llava_bench_conv", "content": "9 3\nworse.", "tuple": [9.0, 3.0]}]
    all_row = summarize_reviews(reviews)[-1]
    assert (all_row.relative, all_row.failed) == (52.9, 0)  # 4.5 / 8.5
    assert all_row.llava_relative == 25.0  # LLaVA reads [-1, -1] and [9, 3]: 1.0 / 4.0


def test_summary_counts_llava_written_minus_one_tuples_as_failed(tmp_path):
    def llava_record(qid: int, content: str, scores: list) -> dict:  # eval_gpt_review_bench.py's output line
        return {"id": qid + 1, "question_id": qid, "answer1_id": qid, "answer2_id": f"a{qid}",
                "category": "llava_bench_conv", "content": content, "tuple": scores}

    reviews = [llava_record(0, "8 6\nok", [8.0, 6.0]), llava_record(1, "Assistant 2 is better.", [-1, -1]),
               llava_record(2, "9 3\nok", [9.0, 3.0])]
    all_row = summarize_reviews(reviews)[-1]
    assert (all_row.reviews, all_row.failed) == (3, 1)
    assert (all_row.relative, all_row.reference, all_row.model) == (52.9, 85.0, 45.0)  # the two real reviews
    assert all_row.llava_relative == 50.0  # LLaVA: (6 - 1 + 3) / 3 over (8 - 1 + 9) / 3
    path = _write(tmp_path / "llava.jsonl", reviews)
    bench_main(["summarize", path, "--markdown", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert "Made with judge not recorded, rule not recorded." in text
    assert "| all | 52.9 | 85.0 | 45.0 | 3 | 1 | 50.0 |" in text


def _rule_file(path: Path, keys: list[str]) -> Path:
    path.write_text(json.dumps({k: {"role": "Assistant", "prompt": f"PROMPT FOR {k}"} for k in keys}))
    return path


def _bench_files(tmp_path: Path, context: dict) -> list[str]:
    """--question/--context/--answer-list arguments of a two-question bench on one image."""
    questions = [{"question_id": i, "image": "a.jpg", "text": f"q{i}", "category": c}
                 for i, c in enumerate(["conv", "complex"])]
    ours = [{"question_id": i, "text": "ours", "answer_id": f"a{i}"} for i in range(2)]
    return ["--question", _write(tmp_path / "q.jsonl", questions), "--context", _write(tmp_path / "c.jsonl", [context]),
            "--answer-list", _write(tmp_path / "ref.jsonl", [{"question_id": i, "text": "ref"} for i in range(2)]),
            _write(tmp_path / "ours.jsonl", ours)]


def test_http_review_takes_the_rule_by_path_and_the_summary_names_judge_and_rule(tmp_path):
    rule = _rule_file(tmp_path / "rule.json", ["llava_bench_conv", "llava_bench_complex"])
    files = _bench_files(tmp_path, {"image": "a.jpg", "caption": "a cat"})
    out = tmp_path / "reviews.jsonl"
    http = ["--judge", "http", "--judge-model", "judge-x", "--judge-retries", "0"]
    with pytest.raises(SystemExit, match="--judge http needs --rule"):
        bench_main(["review", *files, "--output", str(out), *http, "--judge-base-url", "http://127.0.0.1:9"])
    server = _Judge([])
    try:
        bench_main(["review", *files, "--output", str(out), *http, "--judge-base-url", server.url, "--rule", str(rule)])
        other = _rule_file(tmp_path / "other.json", ["llava_bench_conv", "llava_bench_complex"])
        other.write_text(other.read_text() + "\n")  # same prompts, other bytes: another rule file
        with pytest.raises(ValueError, match="not comparable"):  # resuming with another rule is refused
            bench_main(["review", *files, "--output", str(out), *http, "--judge-base-url", server.url, "--rule",
                        str(other)])
    finally:
        server.close()
    prompts = [body["messages"][1]["content"] for _, _, body in server.requests]
    assert len(prompts) == 2 and prompts[1].endswith("[System]\nPROMPT FOR llava_bench_complex\n\n")
    sha = hashlib.sha256(rule.read_bytes()).hexdigest()
    records = read_jsonl(out)
    assert all((r["judge"], r["rule"], r["rule_sha256"]) == ("judge-x", str(rule), sha) for r in records)
    bench_main(["summarize", str(out), "--markdown", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert f"Made with judge judge-x, rule {rule} (sha256 {sha[:12]})." in text
    assert COMPARABILITY in text and "gpt-4-0314" in COMPARABILITY
    unrecorded = _write(tmp_path / "llava.jsonl", [{k: v for k, v in r.items() if k not in ("judge", "rule_sha256")}
                                                     for r in records])
    bench_main(["summarize", str(out), unrecorded, "--markdown", str(tmp_path / "s.md")])
    assert "NOT COMPARABLE: these files were reviewed by different judges" in (tmp_path / "s.md").read_text()


def test_coco_context_picks_rules_by_bare_category_as_llavas_visual_review(tmp_path):
    rule = _rule_file(tmp_path / "rule.json", ["conv", "complex"])  # LLaVA's rule.json has both kinds of keys
    truth = _write(tmp_path / "t.jsonl", [{"question_id": i, "facts": {"color": "red"}} for i in range(2)])
    offline = ["--judge", "shapes", "--ground-truth", truth, "--rule", str(rule)]
    coco = {"image": "a.jpg", "captions": ["a cat", "a pet"], "instances": [{"category": "cat", "bbox": [0, 0, 1, 1]}]}
    bench_main(["review", *_bench_files(tmp_path, coco), "--output", str(tmp_path / "coco.jsonl"), *offline])
    assert [r["category"] for r in read_jsonl(tmp_path / "coco.jsonl")] == ["conv", "complex"]
    wild = _bench_files(tmp_path, {"image": "a.jpg", "caption": "a cat"})
    with pytest.raises(ValueError, match=r"rule\.json has no 'llava_bench_conv' entry"):
        bench_main(["review", *wild, "--output", str(tmp_path / "wild.jsonl"), *offline])


def test_eval_script_needs_a_rule_for_the_http_judge_and_passes_it(tmp_path):
    fake = tmp_path / "bin" / "llava-uta-bench"  # records its arguments; `answer` writes its answers file
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'while [[ $# -gt 0 ]]; do [[ $1 == --answers-file ]] && touch "$2"; shift; done\n')
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "CALLS": str(calls), "BENCH": "coco",
           "ROOT": str(tmp_path / "coco"), "MODEL": "m"}
    script = ["bash", str(REPO / "scripts/eval_llavabench.sh")]
    refused = subprocess.run(script, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "JUDGE=http needs RULE" in refused.stderr and not calls.exists()
    rule = _rule_file(tmp_path / "rule.json", ["conv"])
    subprocess.run(script, env={**env, "RULE": str(rule)}, check=True, capture_output=True)
    review = next(line for line in calls.read_text().splitlines() if line.startswith("review"))
    assert f"--rule {rule}" in review and "--category-prefix" not in review  # COCO keys chosen by the context


def test_retry_failed_asks_only_the_failed_reviews_again_and_keeps_the_order(tmp_path, monkeypatch):
    monkeypatch.setattr("llava_uta.eval.llavabench.judges.time.sleep", lambda s: None)
    questions = [{"question_id": i, "image": "a.png", "text": f"q{i}", "category": "conv"} for i in range(4)]
    ref = [{"question_id": i, "text": f"ref {i}"} for i in range(4)]
    ours = [{"question_id": i, "text": f"ours {i}"} for i in range(4)]
    contexts = {"a.png": {"image": "a.png", "caption": "a red star"}}
    out = tmp_path / "reviews.jsonl"
    server = _Judge(["ok", "500", "500", "garbled", "ok", "ok", "ok"])
    try:
        judge = HttpJudge(base_url=server.url, model="m", max_retries=1, backoff=0.0)
        first = review_all(judge, questions, contexts, ref, ours, RULES, out)
        assert [is_failed(r) for r in first.records] == [False, True, True, False]
        asked = len(server.requests)
        again = review_all(judge, questions, contexts, ref, ours, RULES, out)  # a plain rerun keeps failures
        assert len(server.requests) == asked and [is_failed(r) for r in again.records] == [False, True, True, False]
        retried = review_all(judge, questions, contexts, ref, ours, RULES, out, retry_failed=True)
        asked_twice = len(server.requests)
        review_all(judge, questions, contexts, ref, ours, RULES, out, retry_failed=True)  # nothing left to retry
        assert len(server.requests) == asked_twice
    finally:
        server.close()
    asked_again = [json.loads(r[2]["messages"][1]["content"].split("[Question]\n")[1].split("\n")[0][1:])
                   for r in server.requests[asked:]]
    assert asked_again == [1, 2]  # only the two failed questions went to the judge again
    records = read_jsonl(out)
    assert records == retried.records and [r["question_id"] for r in records] == [0, 1, 2, 3]
    assert records[1]["tuple"] == records[2]["tuple"] == [8.0, 6.0] and not any(map(is_failed, records))
    assert records[0] == first.records[0] and records[3] == first.records[3]
