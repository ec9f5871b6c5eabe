from quantsink.cli import main

raise SystemExit(main())
