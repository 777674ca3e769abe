"""The package's shape (issue: one FIANCEE core, one adapter per backbone): no import cycle
between its modules, the core never imports a backbone, only the registry reads the
backbone's name, no module over about 500 lines."""
import ast
import pathlib
import re

from tests.conftest import REPO

PKG = REPO / 'fiancee_jax'


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob('*.py'):
    rel = path.relative_to(REPO).with_suffix('')
    parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
    out['.'.join(parts)] = path
  return out


def _imports(path: pathlib.Path, name: str, modules: dict) -> set[str]:
  """Package modules `path` imports anywhere (module level or inside a function)."""
  tree = ast.parse(path.read_text())
  is_pkg = path.name == '__init__.py'
  here = name.split('.') if is_pkg else name.split('.')[:-1]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(here[:len(here) - node.level + 1] + ([base] if base else []))
      subs = [f'{base}.{a.name}' for a in node.names]
      # `from pkg import module` imports the module; `from module import name`, the module
      names = [n for n in subs if n in modules] or [base]
    else:
      continue
    for n in names:
      while n and n not in modules:
        n = n.rpartition('.')[0]
      if n and n != name:
        found.add(n)
  return found


def _graph():
  modules = _modules()
  return {m: _imports(p, m, modules) for m, p in modules.items()}


def test_no_import_cycle():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        cycles.append(stack[stack.index(n):] + [n])
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, '\n'.join(' -> '.join(c) for c in cycles)


def test_core_never_imports_a_backbone():
  graph = _graph()
  bad = {m: sorted(n for n in deps if n.startswith(('fiancee_jax.backbones', 'fiancee_jax.registry')))
         for m, deps in graph.items() if m.startswith('fiancee_jax.core')}
  assert not {m: v for m, v in bad.items() if v}, bad


def test_only_the_registry_and_the_config_schema_read_the_backbone_name():
  pattern = re.compile(r"backbone\s*[!=]=|is_heads\(|kind\s*[!=]= *'(oasis|heads)'|== 'megaportraits'")
  hits = [f'{p.relative_to(REPO)}:{i}' for p in PKG.rglob('*.py')
          for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
  assert hits == [], hits


def test_no_module_over_about_500_lines():
  long = {str(p.relative_to(REPO)): n for p in PKG.rglob('*.py')
          if (n := len(p.read_text().splitlines())) > 510}
  assert not long, long
