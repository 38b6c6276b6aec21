"""Every label config parses with the SDK, has the roles the loop needs, and is accepted
by a real Label Studio."""

from __future__ import annotations

import pytest
from label_studio_sdk.label_interface import LabelInterface

import label_configs
from training.label_config import LabelConfigError, read_schema

EXPECTED_KIND = {
    "pairwise": "pairwise",
    "ranking": "ranking",
    "rating": "rating",
    "demonstration": "demonstration",
    "critique": "critique",
}


def test_every_kind_has_a_config():
    assert set(label_configs.NAMES) == set(EXPECTED_KIND)


@pytest.mark.parametrize("name", label_configs.NAMES)
def test_config_parses_with_the_sdk_and_has_its_roles(name):
    xml = label_configs.load(name)
    interface = LabelInterface(xml)
    assert interface.controls, f"{name} has no control tags"
    schema = read_schema(xml)
    assert schema.kind == EXPECTED_KIND[name]
    assert schema.prompt_field == "prompt"
    # Every tag the schema names exists in the SDK's view of the config.
    names = {c.name for c in interface.controls} | {o.name for o in interface.objects}
    for tag in [
        schema.prompt_tag,
        *schema.answer_tags,
        schema.pairwise,
        schema.ranker,
        schema.list_tag,
        schema.answer_box,
        schema.critique,
        schema.refinement,
        schema.reward_display,
    ]:
        assert tag is None or tag in names


def test_renamed_tags_are_found_by_type():
    xml = """<View><Text name="q" value="$question"/><Text name="left" value="$a"/>
    <Text name="right" value="$b"/><Pairwise name="pick" toName="left,right"/></View>"""
    schema = read_schema(xml)
    assert (schema.prompt_field, schema.answer_fields, schema.pairwise) == (
        "question",
        ("a", "b"),
        "pick",
    )


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<View><Text name='prompt' value='$prompt'/></View>", "no RLHF control"),
        (
            "<View><Text name='a' value='$a'/><Text name='b' value='$b'/><Pairwise name='p' toName='a,b'/></View>",
            "no Text tag for the prompt",
        ),
        (
            "<View><Text name='prompt' value='$prompt'/><Ranker name='r' toName='prompt'/></View>",
            "<List>",
        ),
        ("<View><Text name='prompt' value='$prompt'", "not valid XML"),
    ],
)
def test_unfit_config_says_what_is_missing(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        read_schema(xml)


@pytest.mark.label_studio
@pytest.mark.parametrize("name", label_configs.NAMES)
def test_label_studio_accepts_config(make_project, ls_client, name):
    project = make_project(name)
    stored = ls_client.projects.get(id=project.id)
    assert read_schema(stored.label_config).kind == EXPECTED_KIND[name]
