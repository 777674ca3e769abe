import pytest

from fiancee_jax import config as cfg

CONFIGS = ['oasis_synthetic', 'oasis_cityscapes', 'megaportraits_synthetic',
           'megaportraits_voxceleb2']


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'tiny'])
def test_configs_load_and_validate(repo, name, arg):
  c = cfg.load(str(repo / 'configs' / f'{name}.py'), arg)
  assert c.backbone in ('oasis', 'megaportraits')


def test_unknown_key_is_rejected(repo):
  c = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'))
  with pytest.raises(AttributeError):
    c.train.lerning_rate = 1.0  # locked schema: typo caught at assignment
  c.unlock()
  c.train.lerning_rate = 1.0
  with pytest.raises(cfg.ConfigError, match='unknown key config.train.lerning_rate'):
    cfg.validate(c)


@pytest.mark.parametrize('field,value,match', [
    ('data.height', 100, 'multiples of 32'),
    ('branches.sf', 0.0, 'sf=0.0'),
    ('branches.sf', -0.5, 'sf=-0.5'),
    ('branches.min_channels', 100000, 'exceeds the widest layer'),
    ('branches.exits', (1, 5), 'exits'),
    ('routing.alpha', 1.5, 'alpha'),
    ('parallel', 'ddp', 'parallel'),
])
def test_impossible_values(repo, field, value, match):
  c = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'))
  sec, _, key = field.rpartition('.')
  (c[sec] if sec else c)[key] = value
  with pytest.raises(cfg.ConfigError, match=match):
    cfg.validate(c)


def test_megaportraits_checks(repo):
  c = cfg.load(str(repo / 'configs' / 'megaportraits_synthetic.py'))
  c.data.width = 32
  with pytest.raises(cfg.ConfigError, match='square'):
    cfg.validate(c)


@pytest.mark.parametrize('c,sf,unit,want', [
    (1024, 1 / 3, 64, 336), (512, 1 / 3, 64, 168), (128, 1 / 3, 64, 64),  # Table S8
    (1024, 1 / 2, 64, 512), (64, 1 / 4, 64, 64)])
def test_scaled_width_oasis_table_s8(c, sf, unit, want):
  assert cfg.scaled_width(c, sf, 64, unit) == want


@pytest.mark.parametrize('c,sf,want', [(512, 1 / 3, 170), (128, 1 / 3, 42), (64, 1 / 3, 24),
                                        (512, 1 / 15, 34), (256, 1 / 6, 42)])  # Table S9
def test_scaled_width_megaportraits_table_s9(c, sf, want):
  assert cfg.scaled_width(c, sf, 24) == want


def test_config_hash_tracks_shapes(repo):
  a = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'))
  b = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'))
  assert cfg.config_hash(a) == cfg.config_hash(b)
  b.branches.num_steps += 100    # extending a run keeps its identity
  assert cfg.config_hash(a, ('model', 'branches')) == cfg.config_hash(b, ('model', 'branches'))
  sec = ('model', 'branches', 'data', 'bank')  # the predictor rows' fingerprint
  b.data.data_dir, b.data.num_workers, b.bank.backend, b.bank.faiss_threads = '/x', 3, 'faiss', 1
  assert cfg.config_hash(a, sec) == cfg.config_hash(b, sec)  # where and how fast, not what
  b.bank.index = 'ivf'
  assert cfg.config_hash(a, sec) != cfg.config_hash(b, sec)
  b.branches.sf = 0.5
  assert cfg.config_hash(a, ('model', 'branches')) != cfg.config_hash(b, ('model', 'branches'))
  b.model.ch = 8
  assert cfg.config_hash(a) != cfg.config_hash(b)


def test_frames_per_video_is_a_schema_key(repo, tmp_path):
  """data.frames_per_video (video_frames) is in the head-avatar schema, checked, and picks the
  prepared dataset folder; the OASIS schema has no such key."""
  from fiancee_jax.data import builders
  c = cfg.load(str(repo / 'configs' / 'megaportraits_voxceleb2.py'))
  assert c.data.frames_per_video == 8
  c.data.frames_per_video = 0
  with pytest.raises(cfg.ConfigError, match='frames_per_video=0'):
    cfg.validate(c)
  c.data.frames_per_video = 3
  cfg.validate(c)
  b = builders.make_builder(c.data, str(tmp_path))
  assert b.builder_config.frames_per_video == 3 and b.builder_config.name.startswith('512_f3_src')
  o = cfg.load(str(repo / 'configs' / 'oasis_synthetic.py'))
  with pytest.raises(AttributeError):
    o.data.frames_per_video = 4
