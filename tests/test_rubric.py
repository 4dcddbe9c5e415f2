from __future__ import annotations

import pytest

from slm_annotator.model.rubric import RubricError, parse_label_config

SENTIMENT = """<View>
  <Text name="text" value="$text"/>
  <Header value="Overall sentiment of the review"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/><Choice value="Negative" alias="neg"/><Choice value="Neutral"/>
  </Choices>
</View>"""


def test_single_choice_is_nominal_with_alias_and_header_description() -> None:
    rubric = parse_label_config(SENTIMENT)
    (dim,) = rubric.dimensions
    assert dim.level == "nominal"
    assert dim.values == ("Positive", "neg", "Neutral")
    assert dim.description == "Overall sentiment of the review"
    assert rubric.data_keys == ["text"]


def test_numeric_choices_are_ordinal_and_sorted() -> None:
    rubric = parse_label_config(
        '<View><Text name="t" value="$t"/><Choices name="q" toName="t">'
        '<Choice value="2"/><Choice value="-1"/><Choice value="0"/></Choices></View>'
    )
    assert rubric.dimensions[0].level == "ordinal"
    assert rubric.dimensions[0].values == ("-1", "0", "2")


def test_multiple_choice_becomes_one_yes_no_per_option() -> None:
    rubric = parse_label_config(
        '<View><Text name="t" value="$t"/><Choices name="emo" toName="t" choice="multiple">'
        '<Choice value="joy"/><Choice value="anger"/></Choices></View>'
    )
    assert [d.key for d in rubric.dimensions] == ["emo::joy", "emo::anger"]
    assert all(d.values == ("no", "yes") and d.control == "emo" for d in rubric.dimensions)


def test_rating_and_number() -> None:
    rubric = parse_label_config(
        '<View><Text name="t" value="$t"/><Rating name="r" toName="t" maxRating="4" hint="how good"/>'
        '<Number name="n" toName="t" min="0" max="1000" step="1"/></View>'
    )
    rating, number = rubric.dimensions
    assert (rating.level, rating.values, rating.description) == ("ordinal", ("1", "2", "3", "4"), "how good")
    assert number.level == "interval" and number.values[0] == "0" and number.values[-1] == "1000"
    assert len(number.values) <= 21


def test_rubric_text_from_extra_params_wins() -> None:
    rubric = parse_label_config(SENTIMENT, '{"rubric": {"sentiment": "Is the reviewer happy?"}}')
    assert rubric.dimensions[0].description == "Is the reviewer happy?"


def test_unsupported_controls_are_skipped_with_a_warning() -> None:
    rubric = parse_label_config(
        '<View><Text name="t" value="$t"/><TextArea name="note" toName="t"/>'
        '<Labels name="ner" toName="t"><Label value="PER"/></Labels>'
        '<Choices name="c" toName="t"><Choice value="a"/><Choice value="b"/></Choices></View>'
    )
    assert [d.key for d in rubric.dimensions] == ["c"]
    assert len(rubric.warnings) == 2 and "TextArea" in rubric.warnings[0]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('<View><Text name="t" value="$t"/><TextArea name="n" toName="t"/></View>', "nothing to predict"),
        ("<View><Text", "not valid XML"),
        ("", "empty"),
        ('<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
         "nothing to predict"),
        ('<View><Text name="t" value="$t"/><Rating name="r" toName="t" maxRating="x"/></View>', "maxRating"),
        ('<!DOCTYPE x [<!ENTITY a "b">]><View><Text name="t" value="$t"/></View>', "not valid XML"),
    ],
)
def test_bad_configs_raise_a_clear_error(config: str, message: str) -> None:
    with pytest.raises(RubricError, match=message):
        parse_label_config(config)


def test_two_text_objects_are_both_context() -> None:
    rubric = parse_label_config(
        '<View><Text name="question" value="$q"/><Text name="answer" value="$a"/>'
        '<Rating name="helpful" toName="answer"/></View>'
    )
    assert [o.name for o in rubric.objects] == ["question", "answer"]
