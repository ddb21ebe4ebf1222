"""Reading every corpus format, the shared tokenisation and labels, prefix selection and the generators."""

import json

import pytest
from helpers import DATA, run_cli

from memcli.core.corpus import Entry, answer_tokens, load_examples, read_corpus, select_prefix, tokenize
from memcli.core.datagen import RANDOM_KEY, generate_phonebook, generate_random_tokens
from memcli.core.errors import UserError
from memcli.training.forward import collate


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("fields", [("query", "target"), ("question", "matching"), ("prompt", "completion"),
                                    ("key", "value")])
def test_each_jsonl_format(tmp_path, fields):
    k, v = fields
    path = write(tmp_path, "c.jsonl", [{k: "Ada Lovelace:", v: "6123456789", "extra": 1}, {k: "B:", v: "x"}])
    assert read_corpus(path) == [Entry("Ada Lovelace:", "6123456789", 1), Entry("B:", "x", 2)]


def test_txt_is_one_value(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("line one\nline two\n")
    assert read_corpus(path, key="Recite:") == [Entry("Recite:", "line one\nline two\n", 1)]


def test_shared_data_files(tiny_tokenizer):
    pb = load_examples(DATA / "phonebook_llama_PB1000_head20.jsonl", tiny_tokenizer)
    first = json.loads((DATA / "phonebook_llama_PB1000_head20.jsonl").read_text().splitlines()[0])
    assert len(pb) == 20
    assert tiny_tokenizer.decode(pb[0].prompt_ids) == first["query"]
    assert tiny_tokenizer.decode(pb[0].target_ids) == first["target"]
    assert len(pb[0].target_ids) == 10  # SmolLM2 writes one digit per token
    qwen = load_examples(DATA / "phonebook_qwen_PB1000_head20.jsonl", tiny_tokenizer)
    assert len(qwen) == 20
    for name in ("long_context_random_3000chars.jsonl", "long_context_sample_0_tok29709_noise_20_3000chars.jsonl"):
        obj = json.loads((DATA / name).read_text())
        (ex,) = load_examples(DATA / name, tiny_tokenizer)
        assert tiny_tokenizer.decode(ex.prompt_ids) == obj["question"]
        assert tiny_tokenizer.decode(ex.target_ids) == obj["matching"]


def test_labels_only_on_value_and_eos(tiny_tokenizer):
    entries = [Entry("Ada Lovelace:", "6123456789", 1), Entry("Bo:", "7", 2)]
    plain = tokenize(entries, tiny_tokenizer)
    with_eos = tokenize(entries, tiny_tokenizer, eos=True)
    assert with_eos[0].target_ids == (*plain[0].target_ids, tiny_tokenizer.eos_token_id)
    assert with_eos[0].prompt_ids == plain[0].prompt_ids
    batch = collate(with_eos, pad_id=tiny_tokenizer.pad_token_id, device="cpu")
    # The logits at position p-1+j predict target j; the prompt and padding carry no label.
    for i, ex in enumerate(with_eos):
        n = len(ex.target_ids)
        assert batch.mask[i].sum() == n
        assert batch.targets[i, :n].tolist() == list(ex.target_ids)
        for j in range(n):
            assert batch.input_ids[i, batch.positions[i, j] + 1] == ex.target_ids[j]
        assert batch.attention_mask[i].sum() == len(ex)  # from lengths, although pad == eos here


def test_chat_template_renders_the_key_as_a_server_renders_a_chat_request(tiny_tokenizer):
    """--chat-template: the prompt is what llama-cpp-python's chat handler renders from the template stored in the
    model's GGUF for a request with the key as the user's message and no system message (the template's own
    default system prompt); the value ends with the end-of-turn token the server stops at."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from memcli.core import models
    from memcli.core.gguf_reader import read_gguf
    from memcli.gguf.base import base_gguf

    (ex,) = tokenize([Entry("Ada Lovelace:", "6123456789", 1)], tiny_tokenizer, chat_template=True, eos=True)
    template = read_gguf(base_gguf(models.resolve("tiny"))).get("tokenizer.chat_template")
    served = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|im_start|>")(
        messages=[{"role": "user", "content": "Ada Lovelace:"}])
    assert tiny_tokenizer.decode(ex.prompt_ids) == served.prompt
    assert "You are a helpful AI assistant named SmolLM" in served.prompt
    assert tiny_tokenizer.decode(ex.target_ids) == "6123456789<|im_end|>"
    assert "<|im_end|>" in served.stop
    (own,) = tokenize([Entry("Ada Lovelace:", "6123456789", 1)], tiny_tokenizer, chat_template=True,
                      system_prompt="Answer with the number.")
    text = tiny_tokenizer.decode(own.prompt_ids)
    assert "Answer with the number." in text and "SmolLM" not in text
    assert tiny_tokenizer.decode(own.target_ids) == "6123456789"  # eos off: no end of turn


def test_prefix_by_answer_tokens(tiny_tokenizer):
    many = tokenize([Entry(f"K{i}:", "6123456789", i + 1) for i in range(5)], tiny_tokenizer)
    assert len(select_prefix(many, 35)) == 3 and answer_tokens(select_prefix(many, 35)) == 30
    assert select_prefix(many, None) == many
    with pytest.raises(UserError, match="smaller than the first entry"):
        select_prefix(many, 5)
    one = tokenize([Entry("K:", "a b c d e f g", 1)], tiny_tokenizer)
    (cut,) = select_prefix(one, 3)
    assert cut.target_ids == one[0].target_ids[:3] and cut.prompt_ids == one[0].prompt_ids


def test_context_check_names_the_line(tiny_tokenizer, tmp_path):
    path = write(tmp_path, "c.jsonl", [{"key": "a", "value": "b"}, {"key": "z", "value": "word " * 50}])
    with pytest.raises(UserError, match=r"c\.jsonl:2: the entry is \d+ tokens, longer than the model's context of 20"):
        load_examples(path, tiny_tokenizer, n_ctx=20)


@pytest.mark.parametrize("lines, message", [
    (['{"query": "a", "target": "b"}', '{"query": "a", "target": '], r"c\.jsonl:2: malformed JSON"),
    (['{"query": "a"}'], r"c\.jsonl:1: missing fields"),
    (['[1, 2]'], r"c\.jsonl:1: expected a JSON object"),
    (['{"key": "a", "value": 3}'], r"c\.jsonl:1: fields 'key' and 'value' must be strings"),
    (['{"key": "a", "value": ""}'], r"c\.jsonl:1: field 'value' is empty"),
    (['', '  '], r"c\.jsonl is empty"),
    (['{"key": "a", "value": "1"}', '{"key": "b", "value": "2"}', '{"key": "a", "value": "3"}'],
     r"c\.jsonl:1 and .*c\.jsonl:3: the key 'a' has two different values"),
])
def test_bad_corpora(tmp_path, lines, message):
    path = write(tmp_path, "c.jsonl", lines)
    with pytest.raises(UserError, match=message):
        read_corpus(path)


def test_missing_corpus(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_corpus(tmp_path / "nope.jsonl")


def test_phonebook_generator_follows_the_paper():
    rows = generate_phonebook(500, seed=1)
    assert rows == generate_phonebook(500, seed=1) and rows != generate_phonebook(500, seed=2)
    names = [r["query"] for r in rows]
    numbers = [r["target"] for r in rows]
    assert len(set(names)) == 500 and len(set(numbers)) == 500
    for name, number in zip(names, numbers):
        first, last = name[:-1].split(" ")
        assert name.endswith(":") and first.isalpha() and last.isalpha()
        assert len(number) == 10 and number.isdigit() and number[0] in "6789"


def test_random_generator_round_trips(tiny_tokenizer):
    row = generate_random_tokens(300, seed=4, tokenizer=tiny_tokenizer)
    assert row["question"] == RANDOM_KEY
    ids = tiny_tokenizer(row["matching"], add_special_tokens=False).input_ids
    assert len(ids) == 300
    assert tiny_tokenizer.decode(ids) == row["matching"]
    assert row == generate_random_tokens(300, seed=4, tokenizer=tiny_tokenizer)


@pytest.mark.slow  # the default model
def test_default_model_tokenises_like_llama_cpp_on_its_shipped_gguf():
    """transformers' GGUF conversion drops SmolLM's digit split; memcli restores it, so the one tokenisation that
    training uses is the one llama.cpp applies to the same file."""
    from llama_cpp import Llama

    from memcli.core import models

    spec = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(spec)
    llama = Llama(str(spec.gguf_path), vocab_only=True, verbose=False)
    texts = ["a  17 x 123", "Call 6123456789 or  42.", "  007 agents, 3.14159"]
    for path in DATA.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            texts += [v for k, v in obj.items() if k in ("query", "target", "question", "matching")]
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False).input_ids
        assert ours == llama.tokenize(text.encode(), add_bos=False, special=False), text


# --- streaming: the corpus read and tokenised in chunks ---------------------------------------------------------

def test_scan_refuses_the_pair_read_corpus_names_and_counts_entries(tmp_path):
    from memcli.core.corpus import scan_corpus

    rows = [{"query": "A:", "target": "1"}, {"query": "B:", "target": "2"}, {"query": "B:", "target": "2"},
            {"query": "C:", "target": "3"}, {"query": "A:", "target": "1"}, {"query": "C:", "target": "4"},
            {"query": "B:", "target": "5"}]
    path = write(tmp_path, "c.jsonl", rows[:5])
    scan = scan_corpus(path)
    assert scan.entries == 5
    bad = write(tmp_path, "bad.jsonl", rows)  # C (lines 4, 6) is the first conflict by line, not B (2, 7)
    with pytest.raises(UserError, match=r"bad\.jsonl:4 and .*bad\.jsonl:6: the key 'C:'"):
        scan_corpus(bad)
    with pytest.raises(UserError, match=r"bad\.jsonl:4 and .*bad\.jsonl:6: the key 'C:'"):
        read_corpus(bad)
    assert scan_corpus(bad, allow_conflicting_keys=True).entries == 7
    with pytest.raises(UserError, match="empty"):
        scan_corpus(write(tmp_path, "e.jsonl", ["", "  "]))


def test_a_digest_collision_falls_back_to_the_exact_check(tmp_path, monkeypatch):
    from memcli.core import corpus

    path = write(tmp_path, "c.jsonl", [{"query": "A:", "target": "1"}, {"query": "B:", "target": "2"}])
    monkeypatch.setattr(corpus._Digests, "candidate", lambda self: (0, 1))  # a false alarm: A and B differ
    assert corpus.scan_corpus(path).entries == 2


def test_bad_utf8_names_the_byte_offset_in_the_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"query": "A:", "target": "1"}\n{"query": "\xff", "target": "2"}\n')
    with pytest.raises(UserError, match="not UTF-8 text .* at byte 42"):
        read_corpus(path)


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Windows editors start UTF-8 files with EF BB BF."""
    jsonl, txt = tmp_path / "c.jsonl", tmp_path / "doc.txt"
    jsonl.write_bytes(b'\xef\xbb\xbf{"query": "Ada:", "target": "6123"}\n{"query": "Bo:", "target": "7"}\n')
    txt.write_bytes(b"\xef\xbb\xbfline one\nline two\n")
    assert read_corpus(jsonl) == [Entry("Ada:", "6123", 1), Entry("Bo:", "7", 2)]
    assert read_corpus(txt, key="Recite:") == [Entry("Recite:", "line one\nline two\n", 1)]
    jsonl.write_bytes(b'\xef\xbb\xbf{"query": "\xff", "target": "2"}\n')  # 3 + 11 bytes before the bad one
    with pytest.raises(UserError, match="not UTF-8 text .* at byte 14"):
        read_corpus(jsonl)
    txt.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(UserError, match="not UTF-8 text .* at byte 5"):
        read_corpus(txt)


def test_train_reads_a_corpus_and_a_config_with_a_byte_order_mark(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'\xef\xbb\xbf{"query": "Ada:", "target": "6123"}\n')
    config = tmp_path / "settings.yaml"
    config.write_bytes(b"\xef\xbb\xbfmax_steps: 3\ngguf: \"off\"\n")
    result = run_cli("train", corpus, "--out", tmp_path / "run", "--model", "tiny", "--config", config)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["entries"], summary["steps"]) == (1, 3)


@pytest.mark.parametrize("options", [{}, {"chat_template": True, "eos": True}, {"answer_tokens": 45}])
def test_streamed_chunks_are_the_examples_prepare_gives(tiny_tokenizer, options):
    from memcli.core.corpus import iter_prepared, prepare, scan_corpus

    path = DATA / "phonebook_llama_PB1000_head20.jsonl"
    whole = prepare(read_corpus(path), tiny_tokenizer, **options)
    chunks = list(iter_prepared(scan_corpus(path), tiny_tokenizer, chunk=3, **options))
    assert [len(ex) for _, ex in chunks[:-1]] == [3] * (len(chunks) - 1)
    assert [ex for _, examples in chunks for ex in examples] == whole
    assert [e.line for entries, _ in chunks for e in entries] == [ex.line for ex in whole]
    if "answer_tokens" in options:
        assert len(whole) == 4  # 10 answer tokens each: four entries within 45
    # each example's ids are what tokenising its entry alone gives
    for entries, examples in chunks:
        for e, ex in zip(entries, examples):
            assert tokenize([e], tiny_tokenizer, options.get("chat_template", False), options.get("eos", False)) == [ex]


def test_one_long_value_streams_its_prefix(tiny_tokenizer):
    from memcli.core.corpus import iter_prepared, scan_corpus

    path = DATA / "long_context_random_3000chars.jsonl"
    ((_, (ex,)),) = list(iter_prepared(scan_corpus(path), tiny_tokenizer, answer_tokens=7))
    assert len(ex.target_ids) == 7


def test_a_value_gets_the_ids_it_has_after_its_prompt_with_a_sentencepiece_tokenizer(tmp_path):
    """SentencePiece gives a text tokenised alone a leading "▁"; the value's ids must be the ones it has in the
    joined text that a runtime tokenises (key + value), so that greedy decoding after the key emits them."""
    from families import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(tmp_path / "spm")
    key, value = "Jerry Becerra:", "9100672710"
    (ex,) = tokenize([Entry(key, value, 1)], tok)
    joined = tok(key + value).input_ids  # the tokenizer's own ids of the text as a whole
    alone = tok(value, add_special_tokens=False).input_ids
    assert list(ex.prompt_ids) == tok(key).input_ids
    assert list(ex.prompt_ids) + list(ex.target_ids) == joined
    assert list(ex.target_ids) != alone  # the case this is about: alone, the value starts with "▁"
    assert tok.decode(list(ex.target_ids)) == value
