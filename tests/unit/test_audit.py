"""What the cache audit takes for gone (issue 12 item 8): only what a list proves deleted."""

from __future__ import annotations

from gpujob.operator.audit import gone, not_newer


def test_absent_from_a_list_taken_after_it_was_seen_is_gone() -> None:
    assert gone([(("ml", "a"), "10")], [("ml", "20", set())]) == [("ml", "a")]


def test_listed_objects_are_kept() -> None:
    assert gone([(("ml", "a"), "10")], [("ml", "20", {("ml", "a")})]) == []


def test_an_object_seen_after_the_list_began_is_kept() -> None:
    """Created (or changed) after the list's snapshot: absent from it, but not gone."""
    assert gone([(("ml", "a"), "21")], [("ml", "20", set())]) == []


def test_only_the_listed_scope_counts() -> None:
    """A list of namespace `ml` says nothing of namespace `other`; a cluster-wide list covers all."""
    assert gone([(("other", "a"), "10")], [("ml", "20", set())]) == []
    assert gone([(("other", "a"), "10")], [(None, "20", set())]) == [("other", "a")]


def test_versions_that_do_not_compare_are_never_taken_for_gone() -> None:
    assert not not_newer("abc", "20") and not not_newer(None, "20") and not not_newer("10", "")
    assert gone([(("ml", "a"), "opaque")], [("ml", "20", set())]) == []
