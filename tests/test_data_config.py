"""The ``data:`` section: new keys load from YAML overrides and bad values name their key."""
import pytest

from hpdm.config import ConfigError, load_config


def test_data_keys_load_and_validate():
    cfg = load_config(overrides=["data.io_retries=2", "data.endpoint_url=http://127.0.0.1:9000", "data.fps=8"])
    assert (cfg.data.io_retries, cfg.data.endpoint_url, cfg.data.fps) == (2, "http://127.0.0.1:9000", 8.0)


@pytest.mark.parametrize("override,key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("data.max_skip_fraction=1.5", "data.max_skip_fraction"),
    ("data.prefetch=0", "data.prefetch"),
    ("data.endpoint_url=127.0.0.1:9000", "data.endpoint_url"),
    ("data.shuffle_buffer=-2", "data.shuffle_buffer"),
    ("data.synthetic=true", "data.flip"),  # flip is on by default; the synthetic set's classes name a direction
])
def test_bad_data_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert err.value.key == key


def test_an_endpoint_url_with_a_password_is_refused_without_showing_it():
    """botocore cannot use a URL with user:password@ ("not a valid URI", with the password cut from the URL shown),
    so it failed at the first request with a message about a URL that looked right."""
    with pytest.raises(ConfigError, match=r"^data.endpoint_url: http://127.0.0.1:9 is given with a user and password, "
                                          "which S3 clients cannot use: give the credentials through AWS_") as err:
        load_config(overrides=["data.endpoint_url=http://user:url-secret/p@ss@127.0.0.1:9"])
    assert "url-secret" not in str(err.value)
