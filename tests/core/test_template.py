import pytest

from vchat import template as T


def test_reference_strings_exact():
    assert T.DEFAULT_PROMPT == (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.\n\n")
    assert T.TEMPLATE["prompt_qa_with_image"] == "### Image:\n<image>\n\n### Question:\n<question>\n\n### Answer:\n"
    assert T.TEMPLATE["prompt_qa_without_image"] == "### Question:\n<question>\n\n### Answer:\n"
    assert T.SPECIAL_TOKENS == ["### Image:", "<image>"]
    assert T.image_mapping_dict["default"] == "### Image:" and T.image_mapping_dict["8"] == "### Image 8:"
    assert T.DEFAULT_SYSTEM_TOKEN == "### System instuction:"


def test_prompt_images_and_system():
    assert T.prompt("q?") == "### Question:\nq?\n\n### Answer:\n"
    assert T.prompt("q?", num_images=1) == "### Image:\n<image>\n\n### Question:\nq?\n\n### Answer:\n"
    assert T.prompt("q?", num_images=2, first_message=True) == (
        T.DEFAULT_PROMPT + "### Image:\n<image>\n### Image:\n<image>\n\n### Question:\nq?\n\n### Answer:\n")


def test_numbering_across_rounds():
    conv = T.build_conversation([T.Round("a?", 2, "x"), T.Round("b?", 0, "y"), T.Round("c?", 1, None)])
    assert conv[0] == (T.DEFAULT_PROMPT + "### Image 1:\n<image>\n### Image 2:\n<image>\n\n"
                       "### Question:\na?\n\n### Answer:\n", "x")
    assert conv[1] == ("### Question:\nb?\n\n### Answer:\n", "y")
    assert conv[2] == ("### Image 3:\n<image>\n\n### Question:\nc?\n\n### Answer:\n", None)


def test_number_images_offset_and_limits():
    text, nxt = T.number_images("### Image:\n### Image:", start=7)
    assert text == "### Image 7:\n### Image 8:" and nxt == 9
    with pytest.raises(ValueError, match="outside 1..8"):
        T.number_images("### Image:", start=9)
    with pytest.raises(ValueError, match="at most 8 images"):
        T.build_conversation([T.Round("q", 5), T.Round("r", 4)])


def test_clean_question():
    assert T.clean_question("<image>\nWhat is\nthis?") == "What isthis?"
