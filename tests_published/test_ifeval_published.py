"""The IFEval scorer on the paper's own data: it must reproduce the published GPT-4 row and per-instruction counts,
and its sentence counts must agree with an independent punkt on every published response."""

import json

import pytest

from unclutter.ifeval import scoring, text

# Published per-id counts (GPT-4, strict | loose | total), from the data folder's README.
PUBLISHED = {
    "change_case:capital_word_frequency": (17, 19, 25), "change_case:english_capital": (19, 19, 25),
    "change_case:english_lowercase": (36, 37, 39), "combination:repeat_prompt": (26, 26, 41),
    "combination:two_responses": (22, 24, 24), "detectable_content:number_placeholders": (25, 25, 27),
    "detectable_content:postscript": (26, 26, 26), "detectable_format:constrained_response": (8, 8, 10),
    "detectable_format:json_format": (17, 17, 17), "detectable_format:multiple_sections": (13, 13, 14),
    "detectable_format:number_bullet_lists": (27, 27, 31), "detectable_format:number_highlighted_sections": (45, 45, 48),
    "detectable_format:title": (37, 37, 37), "keywords:existence": (38, 38, 39), "keywords:forbidden_words": (42, 44, 49),
    "keywords:frequency": (38, 39, 42), "keywords:letter_frequency": (21, 21, 33), "language:response_language": (30, 30, 31),
    "length_constraints:nth_paragraph_first_word": (9, 11, 12), "length_constraints:number_paragraphs": (23, 23, 27),
    "length_constraints:number_sentences": (35, 35, 52), "length_constraints:number_words": (37, 39, 52),
    "punctuation:no_comma": (44, 48, 66), "startend:end_checker": (22, 22, 26), "startend:quotation": (41, 41, 41),
}  # fmt: skip
RANDOM_LETTER_KEYS = {1122, 1129}


@pytest.fixture(scope="module")
def gpt4(ifeval_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt4")
    return out, scoring.score_files(ifeval_data["inputs"], ifeval_data["responses"], out)


def test_reproduces_published_gpt4_row(gpt4):
    _, s = gpt4
    assert (s["num_prompts"], s["num_instructions"]) == (541, 834)
    assert 415 <= s["prompt_level_strict_count"] <= 417
    assert 696 <= s["instruction_level_strict_count"] <= 698
    assert 429 <= s["prompt_level_loose_count"] <= 431
    assert 712 <= s["instruction_level_loose_count"] <= 714


def test_per_instruction_counts_equal_published(gpt4):
    out, s = gpt4
    strict = [json.loads(line) for line in (out / "eval_results_strict.jsonl").open()]
    loose = [json.loads(line) for line in (out / "eval_results_loose.jsonl").open()]
    # the two random-letter prompts aside: recount without them, compare with the table minus their verdicts
    skip = [i for i, r in enumerate(strict) if r["key"] in RANDOM_LETTER_KEYS]
    assert len(skip) == 2
    for iid, (ps, pl, total) in PUBLISHED.items():
        got = s["per_instruction"][iid]
        assert got["total"] == total, iid
        if iid == "keywords:letter_frequency":  # the published seed-0 run passes both random-letter prompts
            ours = [
                (st, lo)
                for i, (rs, rl) in enumerate(zip(strict, loose, strict=True))
                if i not in skip
                for n, st, lo in zip(
                    rs["instruction_id_list"], rs["follow_instruction_list"], rl["follow_instruction_list"], strict=True
                )
                if n == iid
            ]
            assert (sum(a for a, _ in ours), sum(b for _, b in ours)) == (ps - 2, pl - 2)
        else:
            assert (got["strict"], got["loose"]) == (ps, pl), iid
    assert set(s["per_category"]) == {i.split(":")[0] for i in PUBLISHED}


def test_sentence_counts_agree_with_independent_punkt_on_gpt4_responses(ifeval_data):
    import punkt

    with ifeval_data["responses"].open(encoding="utf-8") as f:
        responses = [json.loads(line)["response"] for line in f]
    assert len(responses) == 541
    mismatches = [r for r in responses if text.count_sentences(r) != len(punkt.sent_tokenize(r))]
    assert not mismatches
