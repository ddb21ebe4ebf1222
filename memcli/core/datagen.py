"""Benchmark corpora (`memcli data`): PhoneBooks of unique names and numbers, and one value of random
vocabulary tokens; written as JSONL through the one atomic writer."""

from __future__ import annotations

import json
import random
from pathlib import Path

from memcli.core.errors import UserError
from memcli.core.runs import write_text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """A corpus file written whole or not at all."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


FIRST_NAMES = """James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Barbara Richard Susan
Joseph Jessica Thomas Sarah Charles Karen Christopher Lisa Daniel Nancy Matthew Betty Anthony Sandra Mark Margaret
Donald Ashley Steven Kimberly Andrew Emily Paul Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian Melissa George
Deborah Timothy Stephanie Ronald Rebecca Jason Sharon Edward Laura Jeffrey Cynthia Ryan Dorothy Jacob Amy Gary
Kathleen Nicholas Angela Eric Shirley Jonathan Emma Stephen Brenda Larry Pamela Justin Nicole Scott Anna Brandon
Samantha Benjamin Katherine Samuel Christine Gregory Debra Alexander Rachel Patrick Carolyn Frank Janet Raymond Maria
Jack Olivia Dennis Heather Jerry Helen Tyler Catherine Aaron Diane Jose Julie Adam Victoria Nathan Joyce Henry Lauren
Zachary Kelly Douglas Christina Peter Ruth Kyle Joan Noah Virginia Ethan Judith Jeremy Evelyn Walter Hannah Christian
Andrea Keith Megan Roger Cheryl Terry Jacqueline Austin Madison Sean Teresa Gerald Abigail Carl Sophia Harold Martha
Dylan Sara Arthur Gloria Lawrence Janice Jordan Kathryn Jesse Ann Bryan Isabella Billy Judy Bruce Charlotte Gabriel
Julia Joe Grace Logan Amber Alan Alice Juan Jean Albert Denise Willie Frances Elijah Danielle Wayne Marilyn Randy
Natalie Vincent Beverly Mason Diana Roy Brittany Ralph Theresa Bobby Kayla Russell Alexis Bradley Doris Philip Lori
Eugene Tiffany""".split()

LAST_NAMES = """Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez
Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark Ramirez Lewis
Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell
Mitchell Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes Stewart Morris Morales
Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson
Watson Brooks Chavez Wood James Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross
Foster Jimenez Powell Jenkins Perry Russell Sullivan Bell Coleman Butler Henderson Barnes Gonzales Fisher Vasquez
Simmons Romero Jordan Patterson Alexander Hamilton Graham Reynolds Griffin Wallace Moreno West Cole Hayes Bryant
Herrera Gibson Ellis Tran Medina Aguilar Stevens Murray Ford Castro Marshall Owens Harrison Fernandez McDonald
Woods Washington Kennedy Wells Vargas Henry Chen Freeman Webb Tucker Guzman Burns Crawford Olson Simpson Porter
Hunter Gordon Mendez Silva Shaw Snyder Mason Dixon Munoz Hunt Hicks Holmes Palmer Wagner Black Robertson Boyd Rose
Stone Salazar Fox Warren Mills Meyer Rice Schmidt Garza Daniels Ferguson Nichols Stephens Soto Weaver Ryan Gardner
Payne Grant Dunn Kelley Spencer Hawkins Arnold Pierce Vazquez Hansen Peters Santos Hart Bradley Knight Elliott
Cunningham Duncan Armstrong Hudson Carroll Lane Riley Andrews Alvarado Ray Delgado Berry Perkins Hoffman Johnston
Matthews Pena Richards Contreras Willis Carpenter Lawrence Sandoval""".split()


def generate_phonebook(entries: int, seed: int) -> list[dict]:
    """The paper's PhoneBook: unique "First Last:" keys, unique 10-digit numbers whose first digit is 6-9."""
    first, last = sorted(set(FIRST_NAMES)), sorted(set(LAST_NAMES))
    capacity = len(first) * len(last)
    if not 1 <= entries <= capacity:
        raise UserError(f"--entries must be between 1 and {capacity}, got {entries}")
    rng = random.Random(seed)
    names = rng.sample(range(capacity), entries)
    numbers: set[str] = set()
    rows = []
    for i in names:
        number = str(rng.randint(6, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9))
        while number in numbers:
            number = str(rng.randint(6, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9))
        numbers.add(number)
        rows.append({"query": f"{first[i // len(last)]} {last[i % len(last)]}:", "target": number})
    return rows


RANDOM_KEY = "Please output the content of the vector memory injected into the activations."


def generate_random_tokens(tokens: int, seed: int, tokenizer) -> dict:
    """A value of `tokens` random vocabulary tokens, as text that re-tokenises to exactly those ids.

    The draw is over "word" tokens: a leading space then letters only, each a token on its own. A byte-level BPE
    pre-tokenizer splits text at those boundaries, so any sequence of them round-trips.
    """
    if tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {tokens}")
    special = set(tokenizer.all_special_ids)
    pool = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        piece = tokenizer.decode([tid])
        if len(piece) > 1 and piece[0] == " " and piece[1:].isalpha() and piece[1:].isascii():
            if tokenizer(piece, add_special_tokens=False).input_ids == [tid]:
                pool.append(tid)
    if len(pool) < 100:
        raise UserError("the model's tokenizer has too few word tokens to draw a random text from")
    rng = random.Random(seed)
    ids = [rng.choice(pool) for _ in range(tokens)]
    text = tokenizer.decode(ids)
    if tokenizer(text, add_special_tokens=False).input_ids != ids:  # guarded, never seen to happen
        raise RuntimeError("random text does not re-tokenise to its ids")
    return {"question": RANDOM_KEY, "matching": text}
