"""Counts on the service page read as the language says them."""

from __future__ import annotations

import pytest

from ctscreen.service.page import counted


@pytest.mark.parametrize(
    ("n", "studies", "of_files"),
    [
        (1, "1 исследование", "из 1 файла"),
        (3, "3 исследования", "из 3 файлов"),
        (5, "5 исследований", "из 5 файлов"),
        (11, "11 исследований", "из 11 файлов"),
        (14, "14 исследований", "из 14 файлов"),
        (21, "21 исследование", "из 21 файла"),
        (24, "24 исследования", "из 24 файлов"),
        (0, "0 исследований", "из 0 файлов"),
    ],
)
def test_russian_counts_take_the_form_their_number_needs(
    n: int, studies: str, of_files: str
) -> None:
    assert counted("studies", n, "ru") == studies
    assert counted("of_files", n, "ru") == of_files


def test_english_counts_are_singular_only_for_one() -> None:
    assert counted("studies", 1, "en") == "1 study"
    assert counted("studies", 2, "en") == "2 studies"
    assert counted("of_files", 1, "en") == "of 1 file"
    assert counted("of_files", 0, "en") == "of 0 files"
