"""`confprobe`: one command line made of three programs. It runs the service, whole
(`serve`) or in parts (`gateway`, `worker`), in `app.supervisor`; administers the registry
on its database (`migrate`, `janitor`, `keys`) in `app.admin`; and uses a running service
through its API (`models`, `adapters`, `datasets`, `extract`, `probes`, `compare`,
`finetune`, `finetunes`, `experiment`, `jobs`) in `confprobe_client.cli`, which needs only
the client package (the API key comes from CONFPROBE_API_KEY). `python -m app.cli` is how
`serve` starts its parts."""

import click

from app import admin, supervisor
from confprobe_client import cli as api_commands
from confprobe_client.exit_codes import EXIT_CODES_HELP


def compose() -> click.Group:
    """The full `confprobe`: the API commands' global options, and every command of the three."""
    group = api_commands.root_group(
        f"Confidence Probing Service: run it, or use a running one through its API.\n\n{EXIT_CODES_HELP}"
    )
    for name, command in api_commands.main.commands.items():
        group.add_command(command, name)
    for command in (*supervisor.COMMANDS, *admin.COMMANDS):
        group.add_command(command)
    return group


main = compose()


if __name__ == "__main__":
    main()
