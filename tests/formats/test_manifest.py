"""Tests for fibquant_cli.formats.manifest: the shape contract, the strict parser and the dump check."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fibquant_cli.errors import InvalidInputError, ResourceError
from fibquant_cli.formats.kvlayout import (
    check_manifest_against_dump,
    entry_layer_views,
    expected_tensor_shape,
    vectors_axes,
)
from fibquant_cli.formats.manifest import (
    AttentionSpec,
    KvShape,
    Manifest,
    ManifestEntry,
    load_manifest,
    manifest_path_for,
    parse_manifest,
    save_manifest,
    validate_manifest,
)

CONTRACT_ORDER = [
    "schema_version", "role", "attention_kind", "batch", "layers", "kv_heads",
    "query_heads", "tokens", "head_dim", "dtype", "rope_state",
]


def shape_json(**changes):
    out = {
        "schema_version": "fib_quant_kv_tensor_shape_v1", "role": "key", "attention_kind": "gqa",
        "batch": 1, "layers": 2, "kv_heads": 2, "query_heads": 4, "tokens": 128, "head_dim": 64,
        "dtype": "f16", "rope_state": "post_rope",
    }
    out.update(changes)
    return out


def kv_shape(**changes) -> KvShape:
    return KvShape(**shape_json(**changes))


def manifest_json():
    return {
        "schema_version": "fibquant_kv_manifest_v1",
        "entries": [
            {"shape": shape_json(), "tensors": ["layer.0.key", "layer.1.key"], "layout": "bhtd"},
            {
                "shape": shape_json(role="value", rope_state="not_applicable"),
                "tensors": ["layer.0.value", "layer.1.value"],
                "layout": "bhtd",
            },
        ],
        "attention": {"query_tensors": ["layer.0.query", "layer.1.query"], "causal": True},
    }


def dump_for(manifest_obj=None):
    """safetensors-style header (name -> (dtype, shape)) matching manifest_json()."""
    return {
        "layer.0.key": ("F16", (1, 2, 128, 64)),
        "layer.1.key": ("F16", (1, 2, 128, 64)),
        "layer.0.value": ("F16", (1, 2, 128, 64)),
        "layer.1.value": ("F16", (1, 2, 128, 64)),
        "layer.0.query": ("F32", (1, 4, 128, 64)),
        "layer.1.query": ("F32", (1, 4, 128, 64)),
    }


def parse_error(obj, cls=InvalidInputError) -> str:
    with pytest.raises(cls) as info:
        parse_manifest(obj, source="m.json")
    message = str(info.value)
    assert "\n" not in message
    return message


def validate_error(shape: KvShape, cls=InvalidInputError) -> str:
    with pytest.raises(cls) as info:
        shape.validate()
    return str(info.value)


# ---------------------------------------------------------------- contract rules


def test_valid_shape_and_counts():
    shape = kv_shape()
    shape.validate()
    assert shape.vector_count == 1 * 2 * 2 * 128
    assert shape.element_count == 1 * 2 * 2 * 128 * 64
    assert list(shape.to_json()) == CONTRACT_ORDER
    assert KvShape(**shape.to_json()) == shape


def test_rule1_schema_version():
    message = validate_error(kv_shape(schema_version="fib_quant_kv_tensor_shape_v2"))
    assert message == ("kv shape schema_version fib_quant_kv_tensor_shape_v2, "
                       "expected fib_quant_kv_tensor_shape_v1")


@pytest.mark.parametrize("name", ["batch", "layers", "kv_heads", "query_heads", "tokens", "head_dim"])
def test_rule2_sizes_must_be_positive(name):
    assert validate_error(kv_shape(**{name: 0})) == f"kv shape {name} must be > 0"
    assert validate_error(kv_shape(**{name: -3})) == f"kv shape {name} must be > 0"


def test_rule2_reports_fields_in_contract_order():
    assert validate_error(kv_shape(head_dim=0, tokens=0, batch=0)) == "kv shape batch must be > 0"
    assert validate_error(kv_shape(head_dim=0, query_heads=0)) == "kv shape query_heads must be > 0"


def test_rule3_mha():
    shape = kv_shape(attention_kind="mha", kv_heads=2, query_heads=4)
    assert validate_error(shape) == "MHA requires query_heads == kv_heads"
    kv_shape(attention_kind="mha", kv_heads=4, query_heads=4).validate()


def test_rule4_mqa():
    shape = kv_shape(attention_kind="mqa", kv_heads=2, query_heads=4)
    assert validate_error(shape) == "MQA requires kv_heads == 1"
    kv_shape(attention_kind="mqa", kv_heads=1, query_heads=7).validate()


def test_rule5_gqa_divisibility():
    shape = kv_shape(attention_kind="gqa", kv_heads=4, query_heads=6)
    assert validate_error(shape) == "query_heads must be divisible by kv_heads"
    kv_shape(attention_kind="gqa", kv_heads=3, query_heads=12).validate()


def test_rule6_key_needs_rope_state():
    assert validate_error(kv_shape(rope_state="not_applicable")) == (
        "key tensors must declare pre_rope or post_rope"
    )
    kv_shape(rope_state="pre_rope").validate()


@pytest.mark.parametrize("rope", ["pre_rope", "post_rope"])
def test_rule7_value_rope_state(rope):
    shape = kv_shape(role="value", rope_state=rope)
    assert validate_error(shape) == "value tensors must use not_applicable rope state"


def test_rule8_integer_beyond_u32_is_resource_error():
    message = validate_error(kv_shape(head_dim=2**32), ResourceError)
    assert message == "kv shape size overflow"
    kv_shape(tokens=2**32 - 1, head_dim=1).validate()


def test_rule8_element_count_beyond_u64():
    big = 2**32 - 1
    fits = kv_shape(attention_kind="mha", batch=big, tokens=big, layers=1, kv_heads=1,
                    query_heads=1, head_dim=1)
    fits.validate()
    assert fits.element_count == big * big
    over = replace(fits, head_dim=2)  # 2 * (2**32 - 1)**2 > 2**64 - 1
    assert validate_error(over, ResourceError) == "kv shape size overflow"
    with pytest.raises(ResourceError):
        _ = over.element_count
    huge = replace(fits, layers=big, kv_heads=big, query_heads=big)
    with pytest.raises(ResourceError):
        _ = huge.vector_count


def test_resource_error_is_not_invalid_input():
    assert not issubclass(ResourceError, InvalidInputError)
    assert ResourceError.exit_code != InvalidInputError.exit_code


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"schema_version": "bad", "batch": 0}, "kv shape schema_version bad, expected"),
        ({"batch": 0, "attention_kind": "mha"}, "kv shape batch must be > 0"),
        ({"attention_kind": "mha", "rope_state": "not_applicable"}, "MHA requires"),
        ({"attention_kind": "mqa", "kv_heads": 2, "query_heads": 3}, "MQA requires"),
        ({"query_heads": 3, "rope_state": "not_applicable"}, "query_heads must be divisible"),
        ({"rope_state": "not_applicable", "head_dim": 2**33}, "key tensors must declare"),
        ({"batch": 0, "head_dim": 2**40}, "kv shape batch must be > 0"),
    ],
)
def test_rules_apply_in_contract_order(changes, expected):
    with pytest.raises((InvalidInputError, ResourceError)) as info:
        kv_shape(**changes).validate()
    assert isinstance(info.value, InvalidInputError)
    assert str(info.value).startswith(expected)


def test_validate_checks_types_of_shapes_built_in_code():
    assert "role 'keys' is not one of key, value" in validate_error(kv_shape(role="keys"))
    assert "dtype 'fp16'" in validate_error(kv_shape(dtype="fp16"))
    assert "batch must be an integer, found bool" in validate_error(kv_shape(batch=True))
    assert "tokens must be an integer, found float" in validate_error(kv_shape(tokens=2.0))


def test_numpy_integers_are_stored_as_python_ints():
    shape = kv_shape(tokens=np.int64(128), head_dim=np.uint32(64))
    assert type(shape.tokens) is int and type(shape.head_dim) is int
    assert shape == kv_shape()


def test_validate_block_dim():
    kv_shape(head_dim=96).validate_block_dim(32)
    kv_shape(head_dim=96).validate_block_dim(96)
    with pytest.raises(InvalidInputError) as info:
        kv_shape(head_dim=96).validate_block_dim(64)
    assert str(info.value) == "head_dim 96 is not divisible by block_dim 64"
    with pytest.raises(InvalidInputError, match="head_dim 96 is not divisible by block_dim 0"):
        kv_shape(head_dim=96).validate_block_dim(0)
    with pytest.raises(InvalidInputError, match="kv shape batch must be > 0"):
        kv_shape(batch=0).validate_block_dim(64)


def test_digest_validates_first():
    with pytest.raises(InvalidInputError, match="kv shape batch must be > 0"):
        kv_shape(batch=0).digest()
    assert kv_shape().digest() != kv_shape(tokens=129).digest()


# ---------------------------------------------------------------- parsing


def test_example_manifest_parses():
    manifest = parse_manifest(manifest_json(), source="m.json")
    key, value = manifest.entries
    assert key.shape == kv_shape()
    assert key.tensors == ("layer.0.key", "layer.1.key")
    assert value.shape.rope_state == "not_applicable"
    assert manifest.attention == AttentionSpec(("layer.0.query", "layer.1.query"), True)


def test_layout_defaults_to_bhtd_and_accepts_bthd():
    obj = manifest_json()
    del obj["entries"][0]["layout"]
    obj["entries"][1]["layout"] = "bthd"
    manifest = parse_manifest(obj, source="m.json")
    assert [e.layout for e in manifest.entries] == ["bhtd", "bthd"]
    obj["entries"][1]["layout"] = "bhdt"
    assert parse_error(obj) == "m.json: entries[1].layout: 'bhdt' is not one of bhtd, bthd"


def test_round_trip():
    manifest = parse_manifest(manifest_json(), source="m.json")
    assert parse_manifest(manifest.to_json(), source="x") == manifest
    assert parse_manifest(json.loads(json.dumps(manifest.to_json())), source="x") == manifest
    no_attention = Manifest(entries=manifest.entries[:1])
    assert "attention" not in no_attention.to_json()
    assert parse_manifest(no_attention.to_json(), source="x") == no_attention
    assert manifest.to_json() == manifest_json()


@given(
    kind=st.sampled_from(["mha", "mqa", "gqa"]),
    kv=st.integers(1, 8),
    group=st.integers(1, 4),
    batch=st.integers(1, 3),
    layers=st.integers(1, 4),
    tokens=st.integers(1, 4096),
    head_dim=st.sampled_from([32, 64, 80, 128]),
    dtype=st.sampled_from(["f16", "bf16", "f32"]),
    rope=st.sampled_from(["pre_rope", "post_rope"]),
    layout=st.sampled_from(["bhtd", "bthd"]),
    single=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_property(kind, kv, group, batch, layers, tokens, head_dim, dtype, rope,
                             layout, single):
    kv = 1 if kind == "mqa" else kv
    queries = kv if kind == "mha" else kv * group
    common = dict(attention_kind=kind, batch=batch, layers=layers, kv_heads=kv,
                  query_heads=queries, tokens=tokens, head_dim=head_dim, dtype=dtype)
    count = 1 if single else layers
    manifest = Manifest(
        entries=(
            ManifestEntry(KvShape(role="key", rope_state=rope, **common),
                          tuple(f"k{i}" for i in range(count)), layout),
            ManifestEntry(KvShape(role="value", rope_state="not_applicable", **common),
                          tuple(f"v{i}" for i in range(count)), layout),
        ),
        attention=AttentionSpec(tuple(f"q{i}" for i in range(count)), causal=single),
    )
    text = json.dumps(manifest.to_json())
    assert parse_manifest(json.loads(text), source="p") == manifest


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o.update(extra=1), "m.json: top level: unknown key 'extra'"),
        (lambda o: o["entries"][1].update(layuot="bhtd"), "m.json: entries[1]: unknown key 'layuot'"),
        (lambda o: o["entries"][1]["shape"].update(head_dimm=64),
         "m.json: entries[1].shape: unknown key 'head_dimm'"),
        (lambda o: o["attention"].update(mask="x"), "m.json: attention: unknown key 'mask'"),
        (lambda o: o.pop("entries"), "m.json: top level: missing key 'entries'"),
        (lambda o: o.pop("schema_version"), "m.json: top level: missing key 'schema_version'"),
        (lambda o: o["entries"][0].pop("tensors"), "m.json: entries[0]: missing key 'tensors'"),
        (lambda o: o["entries"][0].pop("shape"), "m.json: entries[0]: missing key 'shape'"),
        (lambda o: o["entries"][1]["shape"].pop("head_dim"),
         "m.json: entries[1].shape: missing key 'head_dim'"),
        (lambda o: o["entries"][1]["shape"].pop("schema_version"),
         "m.json: entries[1].shape: missing key 'schema_version'"),
        (lambda o: o["attention"].pop("causal"), "m.json: attention: missing key 'causal'"),
        (lambda o: o["attention"].pop("query_tensors"),
         "m.json: attention: missing key 'query_tensors'"),
    ],
)
def test_unknown_and_missing_keys_at_every_level(mutate, expected):
    obj = manifest_json()
    mutate(obj)
    assert parse_error(obj).startswith(expected)


def test_unknown_key_message_lists_allowed_keys():
    obj = manifest_json()
    obj["entries"][1]["shape"]["head_dimm"] = 64
    message = parse_error(obj)
    assert message.endswith(f"(allowed: {', '.join(CONTRACT_ORDER)})")


@pytest.mark.parametrize(
    ("value", "found"),
    [
        (True, "boolean true"),
        (False, "boolean false"),
        ("128", 'string "128"'),
        (128.0, "number 128.0"),
        (None, "null"),
        ([128], "array"),
    ],
)
def test_integers_must_be_json_integers(value, found):
    obj = manifest_json()
    obj["entries"][0]["shape"]["tokens"] = value
    assert parse_error(obj) == f"m.json: entries[0].shape.tokens: expected an integer, found {found}"


def test_enum_values_list_the_allowed_values():
    cases = {
        "role": ("keys", "key, value"),
        "attention_kind": ("GQA", "mha, mqa, gqa"),
        "dtype": ("fp16", "f16, bf16, f32"),
        "rope_state": ("rope", "pre_rope, post_rope, not_applicable"),
    }
    for name, (bad, allowed) in cases.items():
        obj = manifest_json()
        obj["entries"][0]["shape"][name] = bad
        assert parse_error(obj) == f"m.json: entries[0].shape.{name}: '{bad}' is not one of {allowed}"
    obj = manifest_json()
    obj["entries"][0]["shape"]["role"] = 1
    assert parse_error(obj) == "m.json: entries[0].shape.role: expected a string, found integer 1"


def test_contract_errors_are_located_and_keep_their_class():
    obj = manifest_json()
    obj["entries"][1]["shape"]["batch"] = 0
    assert parse_error(obj) == "m.json: entries[1].shape: kv shape batch must be > 0"
    obj = manifest_json()
    obj["entries"][0]["shape"]["head_dim"] = 2**32
    assert parse_error(obj, ResourceError) == "m.json: entries[0].shape: kv shape size overflow"


def test_shape_schema_is_reported_before_other_problems():
    obj = manifest_json()
    shape = obj["entries"][0]["shape"]
    shape.update(schema_version="fib_quant_kv_tensor_shape_v2", batch=0, head_dimm=1)
    assert parse_error(obj) == (
        "m.json: entries[0].shape: kv shape schema_version fib_quant_kv_tensor_shape_v2, "
        "expected fib_quant_kv_tensor_shape_v1"
    )


def test_manifest_schema_version_checked_first():
    obj = manifest_json()
    obj["schema_version"] = "fibquant_kv_manifest_v2"
    obj["new_key"] = 1
    assert parse_error(obj) == (
        "m.json: schema_version: found 'fibquant_kv_manifest_v2', expected fibquant_kv_manifest_v1"
    )
    obj["schema_version"] = 1
    assert parse_error(obj).startswith("m.json: schema_version: found integer 1")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "m.json: entries: expected a non-empty array, found array"),
        ({}, "m.json: entries: expected a non-empty array, found object"),
    ],
)
def test_entries_must_be_a_non_empty_array(value, expected):
    obj = manifest_json()
    obj["entries"] = value
    assert parse_error(obj) == expected


def test_top_level_and_attention_must_be_objects():
    assert parse_error([1]) == "m.json: top level: expected an object, found array"
    obj = manifest_json()
    obj["attention"] = None
    assert parse_error(obj) == "m.json: attention: expected an object, found null"


@pytest.mark.parametrize("value", ["true", 1, None])
def test_causal_must_be_bool(value):
    obj = manifest_json()
    obj["attention"]["causal"] = value
    assert parse_error(obj).startswith("m.json: attention.causal: expected true or false, found")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "entries[0].tensors: expected a non-empty array of tensor names, found array"),
        ("layer.0.key", "entries[0].tensors: expected a non-empty array of tensor names, found string"),
        (["layer.0.key", ""], 'entries[0].tensors[1]: expected a non-empty string, found string ""'),
        (["layer.0.key", 5], "entries[0].tensors[1]: expected a non-empty string, found integer 5"),
    ],
)
def test_tensor_lists(value, expected):
    obj = manifest_json()
    obj["entries"][0]["tensors"] = value
    assert parse_error(obj).startswith("m.json: " + expected)


def test_tensor_count_is_one_or_layers():
    obj = manifest_json()
    obj["entries"][0]["tensors"] = ["a", "b", "c"]
    assert parse_error(obj) == (
        "m.json: entries[0].tensors: expected 1 tensor (5-D) or 2 tensors "
        "(one 4-D tensor per layer), found 3"
    )
    obj["entries"][0]["tensors"] = ["all_keys"]
    parse_manifest(obj, source="m.json")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda o: o["entries"][0]["tensors"].__setitem__(1, "layer.0.key"),
         "m.json: tensor 'layer.0.key': listed twice in the manifest "
         "(entries[0].tensors[0] and entries[0].tensors[1])"),
        (lambda o: o["entries"][1]["tensors"].__setitem__(0, "layer.1.key"),
         "m.json: tensor 'layer.1.key': listed twice in the manifest "
         "(entries[0].tensors[1] and entries[1].tensors[0])"),
        (lambda o: o["attention"]["query_tensors"].__setitem__(1, "layer.0.value"),
         "m.json: tensor 'layer.0.value': listed twice in the manifest "
         "(entries[1].tensors[0] and attention.query_tensors[1])"),
    ],
)
def test_duplicate_tensor_names(mutate, expected):
    obj = manifest_json()
    mutate(obj)
    assert parse_error(obj) == expected


def test_attention_needs_one_consistent_key_and_value_entry():
    obj = manifest_json()
    obj["entries"][1]["shape"]["tokens"] = 64
    assert parse_error(obj) == "m.json: attention: key and value entries differ in tokens (128 vs 64)"
    obj = manifest_json()
    extra = copy.deepcopy(obj["entries"][0])
    extra["tensors"] = ["x.0", "x.1"]
    obj["entries"].append(extra)
    assert parse_error(obj) == (
        "m.json: attention: needs exactly one key entry and one value entry, "
        "found 2 key and 1 value entries"
    )
    del obj["attention"]
    parse_manifest(obj, source="m.json")  # several key entries are fine without attention
    obj = manifest_json()
    obj["attention"]["query_tensors"] = ["q0", "q1", "q2"]
    assert parse_error(obj).startswith("m.json: attention.query_tensors: expected 1 tensor (5-D) or 2")


def test_validate_manifest_checks_manifests_built_in_code():
    entry = ManifestEntry(kv_shape(), ["k0", "k0"])
    assert entry.tensors == ("k0", "k0")
    with pytest.raises(InvalidInputError, match="^src: tensor 'k0': listed twice"):
        validate_manifest(Manifest(entries=[entry]), source="src")
    bad_layout = ManifestEntry(kv_shape(), ("k0", "k1"), "hbtd")
    with pytest.raises(InvalidInputError, match=r"^src: entries\[0\].layout: 'hbtd'"):
        validate_manifest(Manifest(entries=(bad_layout,)), source="src")
    with pytest.raises(InvalidInputError, match=r"^src: entries\[0\].shape: kv shape layers"):
        validate_manifest(Manifest((ManifestEntry(kv_shape(layers=0), ("k",)),)), source="src")


# ---------------------------------------------------------------- files


def write(tmp_path, text, name="kv.manifest.json", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def load_error(path, cls=InvalidInputError) -> str:
    with pytest.raises(cls) as info:
        load_manifest(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_load_and_save_round_trip(tmp_path):
    manifest = parse_manifest(manifest_json(), source="m")
    path = tmp_path / "kv.manifest.json"
    save_manifest(manifest, path)
    assert load_manifest(path) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["kv.manifest.json"]


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "schema_version": "fibquant_kv_manifest_v1"\n  "entries": []\n}\n')
    assert load_error(path) == f"{path}: invalid JSON at line 3, column 3: Expecting ',' delimiter"
    empty = write(tmp_path, "", name="empty.json")
    assert load_error(empty) == f"{empty}: invalid JSON at line 1, column 1: Expecting value"


def test_duplicate_json_keys_are_rejected(tmp_path):
    text = json.dumps(manifest_json()).replace('"batch": 1,', '"batch": 1, "batch": 2,', 1)
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}: entries[0].shape: duplicate key 'batch'"


def test_non_json_constants_are_rejected(tmp_path):
    text = json.dumps(manifest_json()).replace('"tokens": 128', '"tokens": NaN', 1)
    path = write(tmp_path, text)
    assert load_error(path) == f"{path}: invalid JSON: NaN is not a JSON value"


def test_file_level_errors(tmp_path):
    missing = tmp_path / "nope.manifest.json"
    assert load_error(missing).startswith(f"{missing}: cannot read manifest (")
    bad_utf8 = write(tmp_path, b'{"a": "\xff"}', name="bad.json")
    assert load_error(bad_utf8) == f"{bad_utf8}: invalid UTF-8 at byte 7"
    deep = write(tmp_path, "[" * 100_000, name="deep.json")
    assert "invalid JSON" in load_error(deep)


def test_bom_is_accepted(tmp_path):
    path = write(tmp_path, "\ufeff" + json.dumps(manifest_json()))
    assert load_manifest(path) == parse_manifest(manifest_json(), source="m")


def test_errors_from_file_carry_its_name(tmp_path):
    obj = manifest_json()
    obj["entries"][1]["shape"]["head_dimm"] = 1
    path = write(tmp_path, json.dumps(obj, indent=2))
    assert load_error(path).startswith(f"{path}: entries[1].shape: unknown key 'head_dimm'")


def test_manifest_path_for(tmp_path):
    assert manifest_path_for("run/kv.safetensors").as_posix() == "run/kv.manifest.json"
    assert manifest_path_for("a.b.safetensors").as_posix() == "a.b.manifest.json"
    assert manifest_path_for("dump.bin").as_posix() == "dump.bin.manifest.json"


# ---------------------------------------------------------------- against a dump


def check(obj, tensors):
    manifest = parse_manifest(obj, source="m.json")
    check_manifest_against_dump(manifest, tensors, source="kv.safetensors")


def check_error(obj, tensors) -> str:
    with pytest.raises(InvalidInputError) as info:
        check(obj, tensors)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_matching_dump_passes_and_extra_tensors_are_ignored():
    tensors = dump_for()
    tensors["lm_head"] = ("I64", (3,))
    check(manifest_json(), tensors)


def test_missing_tensor():
    tensors = dump_for()
    del tensors["layer.1.key"]
    assert check_error(manifest_json(), tensors) == (
        "kv.safetensors: tensor 'layer.1.key': listed in the manifest at "
        "entries[0].tensors[1] but not present in the file"
    )


def test_shape_mismatch_names_expected_and_found():
    tensors = dump_for()
    tensors["layer.0.key"] = ("F16", (1, 2, 128, 96))
    assert check_error(manifest_json(), tensors) == (
        "kv.safetensors: tensor 'layer.0.key': expected shape [1, 2, 128, 64] "
        "(bhtd: batch, kv_heads, tokens, head_dim), found [1, 2, 128, 96]"
    )


def test_bthd_layout():
    obj = manifest_json()
    for entry in obj["entries"]:
        entry["layout"] = "bthd"
    tensors = {name: (dt, (1, 128, shape[1], 64)) for name, (dt, shape) in dump_for().items()}
    check(obj, tensors)
    # bhtd-ordered data under a bthd manifest is caught
    assert check_error(obj, dump_for()) == (
        "kv.safetensors: tensor 'layer.0.key': expected shape [1, 128, 2, 64] "
        "(bthd: batch, tokens, kv_heads, head_dim), found [1, 2, 128, 64]"
    )


def test_single_five_d_tensors():
    obj = manifest_json()
    obj["entries"][0]["tensors"] = ["keys"]
    obj["entries"][1]["tensors"] = ["values"]
    obj["entries"][1]["layout"] = "bthd"  # 5-D is canonical whatever the layout
    obj["attention"]["query_tensors"] = ["queries"]
    tensors = {
        "keys": ("F16", (1, 2, 2, 128, 64)),
        "values": ("F16", (1, 2, 2, 128, 64)),
        "queries": ("BF16", (1, 2, 4, 128, 64)),
    }
    check(obj, tensors)
    tensors["keys"] = ("F16", (1, 2, 128, 64))
    assert check_error(obj, tensors) == (
        "kv.safetensors: tensor 'keys': expected shape [1, 2, 2, 128, 64] "
        "(batch, layers, kv_heads, tokens, head_dim), found [1, 2, 128, 64]"
    )


def test_one_layer_single_tensor_may_be_4d_or_5d():
    obj = manifest_json()
    for entry, name in zip(obj["entries"], ["k", "v"]):
        entry["shape"]["layers"] = 1
        entry["tensors"] = [name]
    obj["attention"]["query_tensors"] = ["q"]
    check(obj, {"k": ("F16", (1, 2, 128, 64)), "v": ("F16", (1, 1, 2, 128, 64)),
                "q": ("F32", (1, 4, 128, 64))})
    check(obj, {"k": ("F16", (1, 1, 2, 128, 64)), "v": ("F16", (1, 2, 128, 64)),
                "q": ("F16", (1, 1, 4, 128, 64))})


def test_dtype_mismatch():
    tensors = dump_for()
    tensors["layer.1.value"] = ("BF16", (1, 2, 128, 64))
    assert check_error(manifest_json(), tensors) == (
        "kv.safetensors: tensor 'layer.1.value': expected dtype F16 (manifest dtype f16), found BF16"
    )


def test_query_tensors_shape_and_dtype():
    tensors = dump_for()
    tensors["layer.0.query"] = ("BF16", (1, 4, 128, 64))
    check(manifest_json(), tensors)
    tensors["layer.0.query"] = ("I64", (1, 4, 128, 64))
    assert check_error(manifest_json(), tensors) == (
        "kv.safetensors: tensor 'layer.0.query': expected a float dtype (F16, BF16, F32), found I64"
    )
    tensors["layer.0.query"] = ("F32", (1, 2, 128, 64))
    assert check_error(manifest_json(), tensors) == (
        "kv.safetensors: tensor 'layer.0.query': expected shape [1, 4, 128, 64] "
        "(bhtd: batch, query_heads, tokens, head_dim), found [1, 2, 128, 64]"
    )
    del tensors["layer.0.query"]
    assert check_error(manifest_json(), tensors).endswith(
        "listed in the manifest at attention.query_tensors[0] but not present in the file"
    )


def test_query_tensors_follow_the_first_entry_layout():
    obj = manifest_json()
    obj["entries"][0]["layout"] = "bthd"
    tensors = dump_for()
    tensors["layer.0.key"] = tensors["layer.1.key"] = ("F16", (1, 128, 2, 64))
    tensors["layer.0.query"] = tensors["layer.1.query"] = ("F32", (1, 128, 4, 64))
    check(obj, tensors)


# ---------------------------------------------------------------- views


def test_vectors_axes_give_canonical_order():
    rng = np.random.default_rng(1)
    canonical = rng.standard_normal((1, 3, 5, 8))  # batch, heads, tokens, head_dim
    stored_bthd = np.ascontiguousarray(canonical.transpose(0, 2, 1, 3))
    assert vectors_axes("bthd", 4) == (0, 2, 1, 3)
    assert np.array_equal(stored_bthd.transpose(vectors_axes("bthd", 4)), canonical)
    assert vectors_axes("bhtd", 4) == (0, 1, 2, 3)
    assert vectors_axes("bthd", 5) == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError):
        vectors_axes("bhtd", 3)
    with pytest.raises(ValueError):
        vectors_axes("hbtd", 4)


def test_entry_layer_views():
    per_layer = ManifestEntry(kv_shape(layers=3), ("a", "b", "c"))
    assert entry_layer_views(per_layer) == [("a", None), ("b", None), ("c", None)]
    single = ManifestEntry(kv_shape(layers=3), ("all",))
    assert entry_layer_views(single) == [("all", 0), ("all", 1), ("all", 2)]
    one_layer = ManifestEntry(kv_shape(layers=1), ("only",))
    assert entry_layer_views(one_layer) == [("only", None)]


def test_expected_tensor_shape():
    shape = kv_shape()
    assert expected_tensor_shape(shape, "bhtd", 4) == (1, 2, 128, 64)
    assert expected_tensor_shape(shape, "bthd", 4) == (1, 128, 2, 64)
    assert expected_tensor_shape(shape, "bthd", 5) == (1, 2, 2, 128, 64)
    assert expected_tensor_shape(shape, "bthd", 4, heads=shape.query_heads) == (1, 128, 4, 64)
