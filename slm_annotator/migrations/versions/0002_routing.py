"""routing: prediction uncertainty and route, the hard-sample pool, per-route usage

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uncertainty', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('route', sa.String(length=16), nullable=False, server_default=''))
    op.create_table('hard_samples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('task_id', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('annotator', sa.String(length=255), nullable=False),
    sa.Column('values', sa.JSON(), nullable=False),
    sa.Column('task_data', sa.JSON(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'task_id', 'source', 'annotator', name='uq_hard_sample')
    )
    with op.batch_alter_table('hard_samples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hard_samples_project_id'), ['project_id'], unique=False)
    op.create_table('route_usage',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('route', sa.String(length=16), nullable=False),
    sa.Column('items', sa.BigInteger(), nullable=False),
    sa.Column('failures', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('project_id', 'route')
    )


def downgrade() -> None:
    op.drop_table('route_usage')
    with op.batch_alter_table('hard_samples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hard_samples_project_id'))
    op.drop_table('hard_samples')
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('route')
        batch_op.drop_column('uncertainty')
