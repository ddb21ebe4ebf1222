"""`python -m memcli`: the memcli command (memcli.cli.app.main)."""

from memcli.cli.app import main

if __name__ == "__main__":
    main()
