"""``optimum-cli venom ...``: the ``venom-hf`` commands under optimum's CLI.

optimum 2.x loads every ``*.py`` file of the ``optimum.commands.register`` namespace package (PEP 420: no
``__init__.py`` here or above) and registers the classes in its ``REGISTER_COMMANDS``. This file is
imported at every ``optimum-cli`` start, so it imports nothing heavy: the arguments after ``venom`` are
handed to ``venom_hf.cli.main`` when the command runs.
"""

from argparse import REMAINDER, RawDescriptionHelpFormatter

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

_DESCRIPTION = (
    "V:N:M (VENOM) sparsity for Hugging Face Transformers, the same commands as `venom-hf`:\n"
    "  demo   the main job: prune the embedded MiniLM, pack, save/reload, compare outputs and speed\n"
    "  prune  one-shot V:N:M pruning of a checkpoint (packed or dense)\n"
    "  eval   perplexity (causal LM) or BBC News accuracy (classifier)\n"
    "  bench  benchmarks: kernel (SpMM, needs a CUDA GPU), model, e2e, multi-gpu, generate\n"
    "  tune   time the kernels' tile configs on this GPU and write its dispatch table\n"
    "`optimum-cli venom COMMAND --help` shows each command's options."
)


class VenomCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="venom", help="V:N:M sparsity (venom_hf): demo, prune, eval, bench")

    @staticmethod
    def parse_args(parser):
        parser.description = _DESCRIPTION
        parser.formatter_class = RawDescriptionHelpFormatter
        parser.add_argument("venom_args", nargs=REMAINDER, metavar="COMMAND ...",
                            help="demo | prune | eval | bench, then its arguments")

    def run(self):
        import sys

        from venom_hf.cli import main

        argv = list(self.args.venom_args)
        if not argv:
            self.parser.print_help()
            sys.exit(2)
        sys.exit(main(argv, prog="optimum-cli venom"))


REGISTER_COMMANDS = [VenomCommand]
