# The base of every sub-agent container (`h-<name>`): the harness as hive-ag3nt.
{
  imports = [ ./harness-base.nix ];
  hyperhive.role = "agent";
}
